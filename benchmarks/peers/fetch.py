"""Fetch the kernel benchmark's peers into benchmarks/peers/_ext/ (git-ignored; nothing of
them is committed):

  vllm_conv.py   vLLM 0.33.0's Triton causal_conv1d_update / causal_conv1d_fn, the one file
                 taken from its wheel (pip download --no-deps), its three vLLM imports replaced
                 by plain triton and the constants they supplied
  wheels/        fla-core 0.6.0 and einops, to install on a machine without a registry

    python benchmarks/peers/fetch.py
    # on the GPU machine (carry benchmarks/peers/_ext):
    pip install --no-index --no-deps --target /tmp/site benchmarks/peers/_ext/wheels/*.whl
    PYTHONPATH=/tmp/site:benchmarks/peers/_ext python benchmarks/kernels.py \\
        --peer-update vllm_conv:causal_conv1d_update --peer-prefill vllm_conv:causal_conv1d_fn --fla
"""

import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

EXT = Path(__file__).parent / "_ext"
VLLM = "vllm==0.33.0"
WHEELS = ("fla-core==0.6.0", "einops==0.8.2")
CONV = "vllm/model_executor/layers/mamba/ops/causal_conv1d.py"
CONSTANTS = "vllm/v1/attention/backends/utils.py"

# Each vLLM import, and what stands in for it. current_platform is asked two things: whether
# the card takes programmatic dependent launch (vLLM: CUDA capability >= 9) and whether it
# is a CPU (the file's tail then swaps in CPU versions; not here).
IMPORTS = {
    "from vllm.triton_utils import tl, triton\n": "import triton\nimport triton.language as tl\n",
    "from vllm.platforms import current_platform\n": (
        "_PDL = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9\n"),
    "from vllm.v1.attention.backends.utils import NULL_BLOCK_ID, PAD_SLOT_ID\n": "{constants}",
}
CALLS = {"current_platform.is_arch_support_pdl()": "_PDL"}
CPU_TAIL = re.compile(r"\nif current_platform\.is_cpu\(\):\n(    .*\n|\n)*\Z")


def pip_download(spec: str, dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d",
                    str(dest), spec], check=True)
    name = spec.split("==")[0].replace("-", "_")
    (wheel,) = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name)]
    return wheel


def standalone(source: str, constants: str) -> str:
    for old, new in IMPORTS.items():
        if old not in source:
            sys.exit(f"vLLM's file changed: no line {old.strip()!r}")
        source = source.replace(old, new.format(constants=constants))
    for old, new in CALLS.items():
        source = source.replace(old, new)
    source, tails = CPU_TAIL.subn("\n", source)
    if tails != 1 or "vllm" in re.sub(r"#.*", "", source).replace("vllm.", ""):
        sys.exit("vLLM's file changed: its CPU tail or another vLLM import is not where expected")
    return source


def main():
    (EXT / "wheels").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = zipfile.ZipFile(pip_download(VLLM, Path(tmp)))
        utils = wheel.read(CONSTANTS).decode()
        values = [re.search(rf"^{name} = (-?\d+)$", utils, re.M) for name in ("PAD_SLOT_ID", "NULL_BLOCK_ID")]
        constants = "".join(f"{m.group(0)}\n" for m in values)
        source = standalone(wheel.read(CONV).decode(), constants)
    header = f"# Extracted by benchmarks/peers/fetch.py from the {VLLM} wheel ({CONV}); not part of layoutpass.\n"
    (EXT / "vllm_conv.py").write_text(header + source)
    for spec in WHEELS:
        pip_download(spec, EXT / "wheels")
    print(f"wrote {EXT / 'vllm_conv.py'} and {sorted(p.name for p in (EXT / 'wheels').iterdir())}")


if __name__ == "__main__":
    main()
