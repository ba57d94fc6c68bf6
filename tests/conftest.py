import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

# Inherited by the torchrun subprocesses too: CPU DeepSpeed, one thread per rank on a small box,
# W&B never online from a test.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parent.parent
WANDB = "logging.wandb=true"  # an offline W&B run beside metrics.jsonl


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


def torchrun_command(script: Path | str, *args: str, nproc: int = 2) -> list[str]:
    """`script` is a file, or `-m module`."""
    target = ["-m", str(script)[3:]] if str(script).startswith("-m ") else [str(script)]
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        *target, *args,
    ]  # fmt: skip


def torchrun(
    script: Path | str, *args: str, nproc: int = 2, timeout: int = 300, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `script` under torchrun with `nproc` local ranks on a free port (`env` added to the
    environment); fail the test with the ranks' output if it does not exit 0 (unless check is false)."""
    result = subprocess.run(
        torchrun_command(script, *args, nproc=nproc), cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    if check and result.returncode != 0:
        pytest.fail(f"torchrun {script} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


def assert_one_clean_error(output: str, message: str, exit_code: int = 2) -> str:
    """Printed once, by one rank; torchrun's summary names it as the root cause; no traceback from
    our code (torchrun still prints its own). Returns the line printed."""
    printed = [line for line in output.splitlines() if line.startswith("fusion-train: error:")]
    assert len(printed) == 1 and message in printed[0], output[-5000:]
    root_cause = output.split("Root Cause (first observed failure):")[1]
    assert f"exitcode  : {exit_code} " in root_cause and f"traceback : fusion-train: error: {message}" in root_cause
    assert_no_traceback_of_ours(output)
    return printed[0]


def assert_no_traceback_of_ours(output: str) -> None:
    frames = [line for line in output.splitlines() if line.lstrip().startswith('File "')]
    assert not [frame for frame in frames if "/fusion_train/" in frame], output[-5000:]


def start_training(demo_data: dict, run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """`fusion-train` on 2 ranks in the background (its output piped), in a session of its own."""
    command = torchrun_command("-m fusion_train.train", *train_overrides(demo_data, run_dir, *extra))
    return subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def wait_for(condition, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, process.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def rank_processes(process: subprocess.Popen) -> dict[int, psutil.Process]:
    """The ranks torchrun started, by rank."""
    return {int(child.environ()["RANK"]): child for child in psutil.Process(process.pid).children()}


def ended(process: subprocess.Popen, timeout: float) -> str:
    """The invocation's output once it has ended (non-zero), within `timeout` seconds."""
    output = process.communicate(timeout=timeout)[0].decode()
    assert process.returncode != 0, output[-3000:]
    return output


def logged_steps(run_dir: Path) -> int:
    """Lines counted, not parsed: the last may be half written."""
    path = Path(run_dir) / "metrics.jsonl"
    return sum('"resumed_from"' not in line for line in path.read_text().splitlines()) if path.is_file() else 0


def last_logged_step(run_dir: Path) -> int:
    """The step of the newest complete record of metrics.jsonl (0 before any)."""
    path = Path(run_dir) / "metrics.jsonl"
    for line in reversed(path.read_text().splitlines() if path.is_file() else []):
        try:
            return json.loads(line)["step"]
        except ValueError:
            continue  # half written
    return 0


def losses(run_dir: Path) -> list[float]:
    return [m["loss/total"] for m in read_metrics(run_dir) if "loss/total" in m]


def checkpoints(run_dir: Path) -> list[str]:
    """Checkpoint folder names, oldest step first."""
    found = (Path(run_dir) / "checkpoints").glob("step_*")
    return sorted((p.name for p in found), key=lambda n: (n.endswith(".partial"), int(n.split("_")[1].split(".")[0])))


@contextlib.contextmanager
def small_file_system(folder: Path, size: int):
    """A tmpfs of `size` bytes at `folder`, for a disk that fills up: yields a function that
    resizes it. Mounting needs root; the test is skipped, saying so, where it cannot."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"a full disk needs a small file system, and mounting a tmpfs failed: {mounted.stderr.strip()}")
    try:
        yield lambda new_size: subprocess.run(["mount", "-o", f"remount,size={new_size}", str(folder)], check=True)
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


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


@pytest.fixture(scope="session")
def audio_tokenizers(tmp_path_factory):
    """An untrained small EnCodec (8 kHz, 50 frames/s, 2 levels of 64 codes; codebooks drawn from its
    encoder's outputs, so that clips get varied codes) and a text tokenizer for the small layout with
    those audio codes appended: paths of both."""
    from data_pipelines.train_audio_tokenizer import CodebookLearning, small_config
    from fusion_train.tokenizers.audio import AudioTokenizer
    from fusion_train.tokenizers.encodec import Encodec
    from fusion_train.tokenizers.text import train_text_tokenizer
    from helpers import AUDIO_VOCAB, english_documents, write_jsonl

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("audio_tokenizer")
    model = Encodec(small_config(8000, [8, 5, 4], 64, 2))
    with torch.no_grad():
        CodebookLearning(model.quantizer, 2, torch.Generator().manual_seed(0)).start(
            model.encoder(torch.randn(8, 1, 4000))
        )
    audio = AudioTokenizer(model, 2, fingerprint="", device="cpu").save(folder / "codec")
    corpus = write_jsonl(folder / "corpus.jsonl", [{"text": t} for t in english_documents()])
    return audio, train_text_tokenizer([corpus], folder / "text.model", AUDIO_VOCAB).path


@pytest.fixture(scope="session")
def paragraphs(tmp_path_factory):
    """About 700 text records in two files: enough for several chunks of 64 records per part."""
    from helpers import english_documents, write_jsonl

    folder = tmp_path_factory.mktemp("paragraphs")
    texts = [p for document in english_documents() for p in document.split("\n\n") if p.strip()][:700]
    half = len(texts) // 2
    return [write_jsonl(folder / "a.jsonl", [{"text": t} for t in texts[:half]] + [{"no_text": 1}]),
            write_jsonl(folder / "b.jsonl", [{"text": t} for t in texts[half:]])]  # fmt: skip


def built_once(tmp_path_factory, name: str, build):
    """A session fixture's value made once for all pytest workers (xdist gives each its own
    session, and `make test` runs two): `build(folder)` runs in the first worker to ask, under a
    file lock in the workers' common temporary folder; its JSON value is what every worker gets."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    common = tmp_path_factory.getbasetemp().parent  # this run's, shared by its workers
    value = common / f"{name}.json"
    with FileLock(str(common / f"{name}.lock")):
        if not value.is_file():
            value.write_text(json.dumps(build(common / name)))
    return json.loads(value.read_text())


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo's data pipeline at test size: real images, both tokenizers, three kinds of shards."""
    from data_pipelines.demo import make_demo_data

    return built_once(
        tmp_path_factory,
        "demo",
        lambda folder: make_demo_data(folder, images=120, vq_steps=5, sounds=40, audio_steps=5),
    )


@pytest.fixture(scope="session")
def demo_videos(demo_data, tmp_path_factory):
    """The video demo's data at test size (data_pipelines/video_demo.py): 12 clips of 4 s with
    captions and chats, 2 held out, through the demo's tokenizers at 2 frames a second."""
    from data_pipelines.video_demo import make_video_demo_data

    return built_once(
        tmp_path_factory, "videos", lambda folder: make_video_demo_data(demo_data, folder, videos=12, held_out=2)
    )


def train_overrides(demo_data: dict, run_dir: Path, *extra: str) -> list[str]:
    """The tiny model on the demo shards: 128-token sequences, 4 per micro-batch, 2 micro-steps
    per optimizer step on 2 ranks (global batch 2,048 tokens). W&B off (its service costs each
    launch seconds): the tests of what it records turn it on (`WANDB`)."""
    shards = demo_data["shards"]
    return [
        "model.vocab_size=4608", "optim=demo", "optim.warmup_steps=5", "data.seq_len=128", "data.micro_batch_size=4",
        "trainer.global_batch_tokens=2048", f"trainer.run_dir={run_dir}", "logging.log_every=1", "trainer.progress_bar=false",
        "logging.wandb=false",
        f"data.sources.text.path={shards['text']}", f"data.sources.image_text.path={shards['image_text']}",
        f"data.sources.interleaved.path={shards['interleaved']}", f"data.sources.audio_text.path={shards['audio_text']}",
        *extra,
    ]  # fmt: skip


def docs_metric_example(folder: Path) -> str:
    """The worked "new metric" of docs/architecture.md, as written there, saved as
    FOLDER/my_metrics.py: the observer to name in monitor.observers."""
    page = (REPO / "docs" / "architecture.md").read_text()
    code = page.split("### A new metric", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (folder / "my_metrics.py").write_text(code)
    return "my_metrics:ImageTargetShare"


def zero_stage_overrides(demo_data: dict, run_dir: Path, stage: int) -> list[str]:
    """test_every_zero_stage_trains_the_tiny_model's runs: 12 steps under ZeRO-`stage`, a checkpoint,
    a validation of two held-out sources (in full under ZeRO-3, the first 2 micro-batches per rank
    and source elsewhere) and samples every 6, W&B on; ZeRO-1 document-masked through FlexAttention's
    block mask (on a CPU its mask function becomes a dense mask in training; validation runs
    FlexAttention itself)."""
    held_out, text = demo_data["shards"]["held_out"], demo_data["shards"]["text"]
    validation = [
        "eval_data=demo", f"eval_data.sources.held_out.path={held_out}", f"+eval_data.sources.prose.path={text}",
        "eval_data.seq_len=128", "eval_data.micro_batch_size=4", "trainer.eval_every=6",
        f"trainer.eval_batches={'null' if stage == 3 else 2}",
    ]  # fmt: skip
    masking = ["data.document_mask=true", "model.attention=flex"] if stage == 1 else []
    return train_overrides(
        demo_data, run_dir, f"deepspeed=zero{stage}", "trainer.steps=12", "trainer.checkpoint_every=6",
        *sample_overrides(demo_data, every=6), WANDB, *validation, *masking,
    )  # fmt: skip


@pytest.fixture(scope="session")
def pretrained_checkpoint(demo_data, tmp_path_factory):
    """The tiny model after 12 steps on the demo shards (2 ranks, ZeRO-2): what generation and the
    SFT stage start from, and test_every_zero_stage_trains_the_tiny_model[2]'s run. It also logs
    the worked metric of docs/architecture.md, an observer loaded from outside the package."""

    def build(folder: Path) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        run, observer = folder / "run", docs_metric_example(folder)
        overrides = [*zero_stage_overrides(demo_data, run, 2), f"monitor.observers=[{observer}]"]
        torchrun("-m fusion_train.train", *overrides, env={"PYTHONPATH": str(folder)})
        return str(run / "checkpoints" / "step_12")

    return Path(built_once(tmp_path_factory, "pretrained", build))


@pytest.fixture(scope="session")
def zero3_run(demo_data, tmp_path_factory):
    """The tiny model for 6 steps under ZeRO-3 on 2 ranks, a checkpoint at the end: (run folder,
    the ranks' output). Tests that change it work on a copy."""

    def build(folder: Path) -> tuple[str, str]:
        run = folder / "run"
        result = torchrun(
            "-m fusion_train.train", *train_overrides(demo_data, run, "deepspeed=zero3", "trainer.steps=6")
        )
        return str(run), result.stdout + result.stderr

    run, output = built_once(tmp_path_factory, "zero3", build)
    return Path(run), output


def sample_overrides(demo_data: dict, every: int) -> list[str]:
    """The demo's fixed prompts (text, caption -> image, image -> caption) generated every `every` steps."""
    images = Path(demo_data["folder"]) / "held_out" / "images"
    return ["eval_samples=demo", f"eval_samples.image_dir={images}", f"trainer.eval_every={every}"]


def eval_tasks_override(demo_data: dict) -> str:
    """trainer.eval_tasks: the colour and shape of 6 of the demo's held-out pictures as multiple
    choice (data_pipelines/demo.py; the demo's own run captions them too)."""
    questions = Path(demo_data["folder"]) / "held_out" / "questions.jsonl"
    return f"trainer.eval_tasks=[{{name: shapes, path: {questions}, limit: 12, batch_size: 8}}]"


def read_records(run_dir: Path) -> list[dict]:
    """Every record of metrics.jsonl: logged metrics and the marks of each invocation's start."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def read_metrics(run_dir: Path) -> list[dict]:
    return [r for r in read_records(run_dir) if "resumed_from" not in r]


def chromium() -> str:
    """Debian's chromium, installed on first use where the machine allows (as the SLURM test does)."""
    found = shutil.which("chromium")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True)
        found = shutil.which("chromium")
    assert found, "the report test needs Debian's chromium: apt-get install chromium"
    return found


def colour_fraction(pixels: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 30) -> float:
    return float((np.abs(pixels.astype(int) - rgb).max(axis=-1) <= tolerance).mean())


def screenshot(page: Path, out: Path, width: int, height: int = 2400) -> np.ndarray:
    """The page as headless Chromium draws it, RGB pixels [height, width, 3]."""
    subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={width},{height}",
         f"--screenshot={out}", page.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    return np.asarray(Image.open(out).convert("RGB"))


def media_durations(page: Path, element: str = "audio") -> list[float]:
    """The duration in seconds of each <audio> (or <video>) element of `page` once headless Chromium
    has loaded and decoded it (NaN: it could not), read from the DOM the browser dumps."""
    probe = page.with_name(page.stem + "_probe.html")
    script = """<script>
    window.addEventListener("load", async () => {
      const durations = await Promise.all([...document.querySelectorAll("ELEMENT")].map(a => new Promise(done => {
        if (a.readyState >= 1) return done(a.duration);
        a.addEventListener("loadedmetadata", () => done(a.duration)); a.addEventListener("error", () => done(NaN));
        a.load();
      })));
      const out = document.createElement("pre"); out.id = "durations"; out.textContent = JSON.stringify(durations);
      document.body.appendChild(out);
    });</script>"""
    probe.write_text(page.read_text().replace("</body>", script.replace("ELEMENT", element) + "</body>"))
    result = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required",
         "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    dumped = result.stdout.split('<pre id="durations">', 1)[1].split("</pre>", 1)[0]
    return [float("nan") if d is None else float(d) for d in json.loads(dumped)]
