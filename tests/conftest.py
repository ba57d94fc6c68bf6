import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Inherited by the torchrun subprocesses too: CPU DeepSpeed, one thread per rank on a small box,
# W&B never online from a test.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `script` under torchrun with `nproc` local ranks on a free port; fail the test with the
    ranks' output if it does not exit 0."""
    command = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        str(script), *args,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(
            f"torchrun {script.name} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result


@pytest.fixture(scope="session")
def text_tokenizer(tmp_path_factory):
    """A SentencePiece model trained once per test session on the small layout."""
    from fusion_train.tokenizers.text import train_text_tokenizer
    from helpers import SMALL_VOCAB, english_documents, write_jsonl

    folder = tmp_path_factory.mktemp("text_tokenizer")
    corpus = write_jsonl(folder / "corpus.jsonl", [{"text": t} for t in english_documents()])
    return train_text_tokenizer([corpus], folder / "text.model", SMALL_VOCAB)


@pytest.fixture(scope="session")
def image_tokenizer_path(tmp_path_factory):
    """An untrained small VQGAN (32 px -> 4 x 4 codes of 64) in the taming layout: the codes it gives
    are arbitrary but real, which is all shard building needs."""
    from data_pipelines.train_image_tokenizer import small_config
    from fusion_train.tokenizers.image import ImageTokenizer
    from fusion_train.tokenizers.vqgan import VQGAN

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("image_tokenizer")
    return ImageTokenizer(VQGAN(small_config(32, 4, 64)), fingerprint="", device="cpu").save(folder)
