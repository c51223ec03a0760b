"""Shared fixtures: the tiny random InternVL is built once per test session (about 2 s, 1 MB)."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# Without a GPU, Triton kernels (serve/kernels.py) run in Triton's interpreter on CPU tensors. It must be on
# before triton is first imported: triton's own library functions are built for it at import time.
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from internvl_worker.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """The tiny model loaded in fp32 on the CPU, with its template and tiler."""
    from internvl_worker.modeling import load_model

    return load_model(tiny_model_dir, dtype="fp32", device_map=None if _has_cuda() is False else {"": "cpu"})


@pytest.fixture(scope="session")
def sft_dataset(tiny):
    """conversations -> the tiny model's SftDataset over them (rows as the data loader gives them; no
    length budget), for tests that build their own batches."""
    from internvl_worker.train import SftDataset

    class Row:
        def __init__(self, conv, index):
            self.conversation, self.where = conv, f"test row {index + 1}"

    return lambda conversations, uint8=False: SftDataset([Row(c, i) for i, c in enumerate(conversations)], tiny.template, [0] * len(conversations), uint8=uint8)
