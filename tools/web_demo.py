#!/usr/bin/env python
"""Web demo: upload a photo, type class names, see the segmentation (a Gradio app).

    python tools/web_demo.py --output-dir output            # the main job's toy models
    python tools/web_demo.py \\
        --method "OVSeg=configs/two_stage/R101c_vitB16_ade150.yaml::MODEL.WEIGHTS merged.pth" \\
        --fast-config configs/two_stage/R101c_vitB16_ade150_fast.yaml

Without ``--method`` it serves the models the main job (``make demo``) trained in ``--output-dir``:
the two-stage model at the λ / λ_s / MASK_THR its search picked (without seen-class calibration: the
demo's names are the user's), PACL, MGCA and MixReorg, each one found. ``--method
NAME=CONFIG:WEIGHTS:OPTS`` (repeatable) serves any trained config and weights instead. Then open
http://127.0.0.1:7860.

The page: an image (upload or one of the examples: ``--examples``, by default a few toy-world val
images), the vocabulary (comma-separated, or one name per line when names hold commas; a menu of
presets: the toy world's names and the benchmark vocabularies the project registers), the model,
the fast modes (``MODEL.TWO_STAGE.FAST`` of ``--fast-config``; the two-stage model only), the view
(semantic or panoptic, alone or beside the image). It shows the picture with its legend, each
name's share of the pixels as a table and a line saying what was found. Requests run one at a time
(a queue); an empty or over-long vocabulary (``--max-names``) or an unreadable upload gets a message
saying so; uploads larger than ``--max-side`` pixels are reduced. Text embeddings are cached across
requests. Nothing is fetched from the network: the page's fonts are the browser's own.
"""

import argparse
import importlib.util
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detectron2.utils.logger import setup_logger  # noqa: E402

import ov_seg  # noqa: E402,F401 (registration)
from ov_seg.engine.demo_service import (  # noqa: E402
    DemoInputError,
    DemoMethod,
    DemoService,
    preset_vocabularies,
)
from ov_seg.engine.methods import build_method, parse_method_spec  # noqa: E402
from ov_seg.engine.setup import get_ov_seg_cfg  # noqa: E402
from ov_seg.utils.threads import set_num_threads  # noqa: E402

logger = logging.getLogger("ov_seg.web_demo")
FAST_CONFIG = "configs/toyworld/two_stage_R18_fast.yaml"
CUSTOM = "(your own names)"
EXAMPLES = 4  # toy-world val images offered as examples by default
SINGLE_STAGE_NAMES = {"pacl": "PACL", "mgca": "MGCA", "mixreorg": "MixReorg"}


def _main_job():
    """tools/run_main_job.py as a module (where the main job's models are)."""
    spec = importlib.util.spec_from_file_location(
        "run_main_job", REPO / "tools" / "run_main_job.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main_job_methods(out: Path) -> List[str]:
    """``NAME=CONFIG:WEIGHTS:OPTS`` of each model the main job trained in ``out`` (missing ones
    left out): the two-stage model at the λ / λ_s / MASK_THR of its uncalibrated search pick, then
    the single-stage models."""
    import json

    job = _main_job()
    specs = []
    opts = job.two_stage_weights(out)
    if all(Path(p).is_file() for p in opts[1::2]):
        search = out / "two_stage_search" / "search.json"
        if search.is_file():
            record = json.loads(search.read_text())
            picks = record.get("cross_validated", {}).get("searched", {}).get("picks")
            pick = picks[0] if picks else record["best"]
            opts += job.pick_options({k: v for k, v in pick.items() if k != "gamma"})
        specs.append(f"two-stage OVSeg={REPO / job.TWO_STAGE_CONFIG}::{shlex.join(opts)}")
    for method in job.SINGLE_STAGE:
        if (out / method / "model_final.pth").is_file():
            name = SINGLE_STAGE_NAMES.get(method, method)
            specs.append(f"{name}={job.single_stage_spec(out, method)}")
    return specs


def fast_options(config: str) -> List:
    """``[KEY, VALUE, ...]`` of the ``MODEL.TWO_STAGE.FAST`` node of ``config`` ("" = none)."""
    if not config:
        return []
    cfg = get_ov_seg_cfg()
    cfg.merge_from_file(config)
    return [
        x for k, v in cfg.MODEL.TWO_STAGE.FAST.items() for x in (f"MODEL.TWO_STAGE.FAST.{k}", v)
    ]


def load_methods(specs: List[str], fast_config: str) -> Dict[str, DemoMethod]:
    """{name: DemoMethod} of ``NAME=CONFIG:WEIGHTS:OPTS`` specs (built now, weights loaded)."""
    fast = fast_options(fast_config)
    methods = {}
    for text in specs:
        name, config, weights, opts = parse_method_spec(text)
        config = config if os.path.isabs(config) else str(REPO / config)
        cfg, model = build_method(get_ov_seg_cfg(), config, weights, opts)
        methods[name] = DemoMethod(cfg, model, fast)
        logger.info("loaded %s (%s)", name, cfg.MODEL.META_ARCHITECTURE)
    return methods


def default_examples() -> List[str]:
    """A few toy-world val images (``$DETECTRON2_DATASETS/toyworld``), when generated."""
    root = Path(os.environ.get("DETECTRON2_DATASETS", REPO / "datasets")) / "toyworld"
    folder = root / "val" / "images"
    return [str(p) for p in sorted(folder.glob("*.png"))[:EXAMPLES]] if folder.is_dir() else []


def build_app(service: DemoService, examples: List[str], title: str = "ov_seg web demo"):
    """The Gradio page of ``service`` (``gradio.Blocks``, queued: one request at a time); start it
    with ``launch``."""
    import gradio as gr

    presets = preset_vocabularies(service.max_names)
    methods = list(service.methods)
    toy = presets.get("toy world", "")
    example_names = ", ".join(toy.split(", ")[:8]) if "\n" not in toy else ""

    def run(image, vocabulary, method, fast, view, side_by_side):
        # inputs arrive unprocessed (the click's preprocess=False): the image as the upload's
        # record, whose file gradio has checked to be in its upload cache; the service decodes
        # it, so that an unreadable upload gets the service's message, not gradio's
        path = image.get("path") if isinstance(image, dict) else image
        try:
            result = service.segment(path, vocabulary, method, bool(fast), view, bool(side_by_side))
        except DemoInputError as e:
            return None, [], f"⚠ {e}"
        return result.picture, [list(row) for row in result.table], result.message

    def preset_text(name):
        return presets.get(name, gr.update())

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(
            f"## {title}\nUpload an image (or pick an example), type class names separated by "
            "commas, press **Segment**."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    type="filepath", label="image", sources=["upload"], elem_id="image"
                )
                preset = gr.Dropdown(
                    [CUSTOM, *presets], value=CUSTOM, label="preset vocabulary", elem_id="preset"
                )
                vocabulary = gr.Textbox(
                    value=example_names,
                    lines=2,
                    max_lines=12,
                    label=f"vocabulary: names separated by commas (at most {service.max_names})",
                    placeholder="red star, grass, sky",
                    elem_id="vocabulary",
                )
                method = gr.Radio(methods, value=methods[0], label="model", elem_id="method")
                with gr.Row():
                    fast = gr.Checkbox(label="fast modes (two-stage)", elem_id="fast")
                    view = gr.Radio(
                        ["semantic", "panoptic"], value="semantic", label="view", elem_id="view"
                    )
                    side = gr.Checkbox(label="beside the image", elem_id="side")
                submit = gr.Button("Segment", variant="primary", elem_id="submit")
                if examples:
                    gr.Examples(examples=[[p] for p in examples], inputs=[image], label="examples")
            with gr.Column():
                picture = gr.Image(
                    type="numpy", format="png", label="segmentation", interactive=False,
                    elem_id="result",
                )  # fmt: skip
                message = gr.Textbox(label="found", interactive=False, elem_id="message")
                table = gr.Dataframe(
                    headers=["name", "share of pixels"],
                    datatype=["str", "str"],
                    interactive=False,
                    label="share of the image's pixels per name",
                    elem_id="shares",
                )
        preset.change(preset_text, preset, vocabulary)
        submit.click(
            run,
            [image, vocabulary, method, fast, view, side],
            [picture, table, message],
            preprocess=False,
            concurrency_limit=1,
        )
    return app.queue(default_concurrency_limit=1, max_size=32)


def launch(app, host: str, port: int, allowed_paths: List[str], block: bool = True) -> None:
    """Serve ``app`` on ``host:port`` (system fonts only: the page fetches nothing)."""
    import gradio as gr

    font = ["ui-sans-serif", "system-ui", "sans-serif"]
    theme = gr.themes.Default(font=font, font_mono=["ui-monospace", "monospace"])
    app.launch(
        server_name=host,
        server_port=port,
        allowed_paths=allowed_paths,
        prevent_thread_lock=not block,
        quiet=not block,
        theme=theme,
        ssr_mode=False,
    )


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output-dir", default="output", help="the main job's folder (toy models)")
    p.add_argument(
        "--method", action="append", default=[], help="NAME=CONFIG:WEIGHTS:OPTS (repeatable)"
    )
    p.add_argument(
        "--fast-config",
        default=str(REPO / FAST_CONFIG),
        help="config whose MODEL.TWO_STAGE.FAST keys the fast switch applies ('' = none)",
    )
    p.add_argument("--examples", nargs="*", default=None, help="example images")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-names", type=int, default=300, help="most class names of a request")
    p.add_argument("--max-side", type=int, default=1024, help="larger uploads are reduced")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the CPU's cores)")
    return p


def main(argv: Optional[List[str]] = None):
    args = get_parser().parse_args(argv)
    setup_logger(name="ov_seg")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    set_num_threads(args.threads)
    specs = args.method or main_job_methods(Path(args.output_dir).resolve())
    if not specs:
        sys.exit(
            f"no trained model in {args.output_dir}: run `make demo` first, or pass --method "
            "NAME=CONFIG:WEIGHTS:OPTS"
        )
    service = DemoService(load_methods(specs, args.fast_config), args.max_names, args.max_side)
    examples = default_examples() if args.examples is None else args.examples
    app = build_app(service, examples)
    launch(app, args.host, args.port, sorted({str(Path(p).resolve().parent) for p in examples}))


if __name__ == "__main__":
    main()
