from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent


def _reqs(name):
    lines = (here / name).read_text().splitlines()
    return [x.split("#")[0].strip() for x in lines if x.split("#")[0].strip()]


setup(
    name="ov_seg",
    version="0.1.0",
    description="Open-vocabulary semantic segmentation on detectron2: OVSeg, PACL, MGCA, MixReorg",
    python_requires=">=3.10",
    packages=find_packages(include=["ov_seg", "ov_seg.*"]),
    package_data={"ov_seg": ["modeling/clip/model_configs/*.json"]},
    install_requires=_reqs("requirements.txt"),
    extras_require={
        "detectron2": _reqs("requirements-detectron2.txt"),
        "dev": _reqs("requirements-dev.txt"),
    },
)
