"""Whether the embedder runs on a GPU, told without importing torch in the process that asks.

`service.py` needs the answer to declare its services (workers, batch limit), in every process `bentoml serve`
starts. Importing torch costs a process ~470 MB and ~3 s, so where a GPU may be, a short-lived child process
asks torch once, for the supervisor (which reads service.py first), and its workers find the answer in the
environment they inherit: neither the supervisor nor the entry's workers ever import torch
(tests/test_service.py). Where there is no GPU driver, no child is started and every start skips those ~3 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ANSWER = "_IMAGESEARCH_EMBEDS_ON_GPU"  # the supervisor's answer, inherited by every worker it starts
# Without one of these, torch finds no GPU: NVIDIA's driver, WSL2's GPU, AMD's (ROCm builds of torch call it cuda)
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/dxg", "/dev/kfd")
ROOT = Path(__file__).resolve().parents[1]  # where `model_store` can be imported from


def embeds_on_gpu(device: str) -> bool:
    """Whether an embedder set to `device` (IMAGESEARCH_DEVICE: auto, cpu, cuda, ...) runs on a GPU."""
    key = f"{device}="
    probed = os.environ.get(ANSWER, "")
    if not probed.startswith(key):
        probed = os.environ[ANSWER] = key + str(int(may_have_gpu(device) and torch_finds_gpu(device)))
    return probed == key + "1"


def may_have_gpu(device: str) -> bool:
    """False where the embedder will not run on a GPU, told without importing torch."""
    if device != "auto":
        return device != "cpu"
    return sys.platform != "linux" or any(map(os.path.exists, GPU_DEVICE_FILES))


def torch_finds_gpu(device: str) -> bool:
    """Asked in a child process, which alone imports torch."""
    ask = "import sys; from model_store.embedder import pick_device; print(pick_device(sys.argv[1]).type)"
    answer = subprocess.run([sys.executable, "-c", ask, device], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    if answer.returncode != 0:
        raise RuntimeError(f"cannot tell whether the embedder has a GPU (IMAGESEARCH_DEVICE={device!r}): "
                           f"{answer.stderr.strip()[-2000:]}")
    return answer.stdout.split()[-1:] == ["cuda"]  # the last word: whatever else an import may print
