"""Fetch the kernel benchmark's peers into benchmarks/peers/_ext/ (git-ignored; nothing of
them is committed):

  vllm_conv.py   vLLM 0.33.0's Triton causal_conv1d_update / causal_conv1d_fn, the one file
                 taken from its wheel (pip download --no-deps), its three vLLM imports replaced
                 by plain triton and the constants they supplied
  vllm_ssm.py    vLLM 0.33.0's Triton selective_state_update (Mamba2 SSM decode), from
                 mamba/ops/mamba_ssm.py, with its tuned block-size tables for NVIDIA cards
                 (configs/, read from beside the file as vLLM does) and fast_exp from
                 triton_helpers.py
  vllm_gdn.py    vLLM 0.33.0's Triton fused recurrent gated delta rule (GDN decode), from
                 third_party/flash_linear_attention/ops/fused_recurrent.py, plus the
                 fused_recurrent_kda(_fwd) entry points of that package's kda.py (KDA decode,
                 the same kernel)
  wheels/        fla-core 0.6.0 and einops, to install on a machine without a registry

The vLLM files are pinned by SHA-256 and each vLLM import is replaced by a stand-in named
below (plain triton/torch, the constants, a logger, the platform questions the kernels ask);
the script stops with a message when a file or an expected line differs.

    python benchmarks/peers/fetch.py
    # on the GPU machine (carry benchmarks/peers/_ext):
    pip install --no-index --no-deps --target /tmp/site benchmarks/peers/_ext/wheels/*.whl
    PYTHONPATH=/tmp/site:benchmarks/peers/_ext python benchmarks/kernels.py \\
        --peer-update vllm_conv:causal_conv1d_update --peer-prefill vllm_conv:causal_conv1d_fn --fla
    PYTHONPATH=/tmp/site:benchmarks/peers/_ext python benchmarks/recurrent.py --fla \\
        --peer-ssm vllm_ssm:selective_state_update --peer-gdn vllm_gdn:fused_recurrent_gated_delta_rule \\
        --peer-kda vllm_gdn:fused_recurrent_kda
"""

import ast
import hashlib
import re
import shutil
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


SSM = "vllm/model_executor/layers/mamba/ops/mamba_ssm.py"
SSM_HELPERS = "vllm/model_executor/layers/mamba/ops/triton_helpers.py"
SSM_CONFIGS = "vllm/model_executor/layers/mamba/ops/configs/selective_state_update/"
GDN = "vllm/third_party/flash_linear_attention/ops/fused_recurrent.py"
KDA = "vllm/third_party/flash_linear_attention/ops/kda.py"
PINNED = {  # sha256 of the files the recurrent peers come from, in vllm 0.33.0's wheel
    SSM: "6e765aa767e621cbb79635cf1e9a18e1501e76048685b5e36a75c3ca933cc608",
    SSM_HELPERS: "78c037d5c94a2f77d1a3465df040544124a2d0ff10feb6cdbe6653af691e9726",
    GDN: "b065f160e94371192ce743bcd1ce3a9c75ddcecf31be243af4d55b39a898685e",
    KDA: "10ee5bc177770eeba34da96001957d07c8c23473ecad972e2a46bea57421a677",
}

# What the recurrent peers' vLLM imports stand for, written here (the platform answers from
# torch; get_device_name_as_file_name: the card's name with spaces and slashes as "_", which
# is how vLLM names its tuned config files, e.g. "NVIDIA_H200").
STANDINS = '''
import logging as _logging
import re
from types import SimpleNamespace as _NS

import torch as _torch
import triton
import triton.language as tl


class _Platform:
    def is_cuda(self):
        return _torch.cuda.is_available()

    def is_xpu(self):
        return False

    def get_device_name(self, device_id=0):
        return _torch.cuda.get_device_name(device_id) if _torch.cuda.is_available() else "cpu"

    def is_device_capability_family(self, family, device_id=None):
        return _torch.cuda.is_available() and _torch.cuda.get_device_capability(device_id)[0] * 10 == family


class _OnceLogger:
    def __init__(self, name):
        self._log, self._seen = _logging.getLogger(name), set()

    def _once(self, level, msg, args):
        if msg not in self._seen:
            self._seen.add(msg)
            self._log.log(level, msg, *args)

    def info_once(self, msg, *args, **kwargs):
        self._once(_logging.INFO, msg, args)

    def warning_once(self, msg, *args, **kwargs):
        self._once(_logging.WARNING, msg, args)


def _device_file_name(device_id=0):
    return "_".join(_Platform().get_device_name(device_id).replace("/", " ").split())


def _version_tuple(text):
    return tuple(int(part) for part in re.findall(r"\\d+", text)[:3])
'''
SSM_IMPORTS = {
    "from packaging import version\n": STANDINS + "\nversion = _NS(parse=_version_tuple)\n",
    "import vllm.envs as envs\n": "envs = _NS(VLLM_TUNED_CONFIG_FOLDER=os.environ.get(\"VLLM_TUNED_CONFIG_FOLDER\"))\n",
    "from vllm import _custom_ops as ops\n": "ops = None  # selective_scan_fn's CUDA ops: not extracted\n",
    "from vllm.logger import init_logger\n": "init_logger = _OnceLogger\n",
    "from vllm.model_executor.layers.mamba.ops.triton_helpers import fast_exp\n": "{fast_exp}",
    "from vllm.platforms import current_platform\n": "current_platform = _Platform()\n",
    "from vllm.triton_utils import HAS_TRITON, tl, triton\n": "HAS_TRITON = True\n",
    "from vllm.utils.platform_utils import get_device_name_as_file_name\n": (
        "get_device_name_as_file_name = _device_file_name\n"),
    "from vllm.v1.attention.backends.utils import NULL_BLOCK_ID\n": "{constants}",
    "if current_platform.is_xpu():\n    from vllm._xpu_ops import xpu_ops\n": "",
}
SSM_CPU_TAIL = re.compile(r"\nfrom vllm\.platforms import current_platform  # noqa: E402\n\n"
                          r"if current_platform\.is_cpu\(\):\n(    .*\n|\n)*\Z")
GDN_IMPORTS = {
    "from vllm.platforms import current_platform\n": STANDINS + "\ncurrent_platform = _Platform()\n",
    "from vllm.triton_utils import tl, triton\n": "",
    # ops/op.py's choice without FLA_USE_FAST_OPS=1 (tl.exp, tl.log), as inlined jit functions
    # rather than aliases: the same compiled code, and Triton's interpreter (the dry run) runs it
    "from .op import exp, log\n": ("\n@triton.jit\ndef exp(x):\n    return tl.exp(x)\n\n\n"
                                   "@triton.jit\ndef log(x):\n    return tl.log(x)\n"),
}
KDA_ENTRIES = ("fused_recurrent_kda_fwd", "fused_recurrent_kda")


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


def pinned(wheel: zipfile.ZipFile, name: str) -> str:
    data = wheel.read(name)
    if hashlib.sha256(data).hexdigest() != PINNED[name]:
        sys.exit(f"vLLM's file changed: {name} is not the pinned {VLLM} file (sha256 differs)")
    return data.decode()


def replaced(source: str, imports: dict, name: str, **values) -> str:
    for old, new in imports.items():
        if source.count(old) != 1:
            sys.exit(f"vLLM's file changed: {name} has {source.count(old)} lines {old.strip()!r}, expected 1")
        source = source.replace(old, new.format(**values))
    return source


def functions(source: str, names: tuple[str, ...], name: str) -> str:
    """The source text of the named top-level functions (decorators included)."""
    found = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)}
    missing = [n for n in names if n not in found]
    if missing:
        sys.exit(f"vLLM's file changed: {name} has no {missing}")
    lines = source.splitlines(keepends=True)
    return "\n\n".join("".join(lines[(found[n].decorator_list[0] if found[n].decorator_list else found[n]).lineno - 1:
                                      found[n].end_lineno]) for n in names)


def self_contained(source: str, name: str, needs: tuple[str, ...]) -> str:
    """The extracted module must parse, import nothing of vLLM (nor relatively) and define `needs`."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "vllm") or \
                isinstance(node, ast.Import) and any(a.name.split(".")[0] == "vllm" for a in node.names):
            sys.exit(f"vLLM's file changed: {name} still imports {ast.unparse(node)!r}")
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    if set(needs) - defined:
        sys.exit(f"vLLM's file changed: {name} lacks {sorted(set(needs) - defined)}")
    return source


def recurrent_peers(wheel: zipfile.ZipFile, constants: str) -> None:
    """vllm_ssm.py (+ configs/) and vllm_gdn.py; see the module doc."""
    fast_exp = functions(pinned(wheel, SSM_HELPERS), ("fast_exp",), SSM_HELPERS) + "\n"
    ssm = replaced(pinned(wheel, SSM), SSM_IMPORTS, SSM, fast_exp=fast_exp, constants=constants)
    ssm, tails = SSM_CPU_TAIL.subn("\n", ssm)
    if tails != 1:
        sys.exit(f"vLLM's file changed: {SSM}'s CPU tail is not where expected")
    header = f"# Extracted by benchmarks/peers/fetch.py from the {VLLM} wheel ({SSM}, {SSM_HELPERS}); " \
             "not part of layoutpass.\n"
    (EXT / "vllm_ssm.py").write_text(header + self_contained(ssm, SSM, ("selective_state_update", "fast_exp")))
    configs = EXT / "configs" / "selective_state_update"
    shutil.rmtree(configs, ignore_errors=True)
    configs.mkdir(parents=True)
    names = [n for n in wheel.namelist() if n.startswith(SSM_CONFIGS + "headdim=") and ",device_name=NVIDIA_" in n
             and n.endswith(".json")]  # NVIDIA cards' only: plain file names to carry
    if not any("NVIDIA_H200" in n for n in names):
        sys.exit(f"vLLM's file changed: no NVIDIA_H200 tables under {SSM_CONFIGS}")
    for n in names:
        (configs / n[len(SSM_CONFIGS):]).write_bytes(wheel.read(n))
    gdn = replaced(pinned(wheel, GDN), GDN_IMPORTS, GDN)
    kda = functions(pinned(wheel, KDA), KDA_ENTRIES, KDA)
    gdn += f"\n\n# From {KDA}: its decode entry points, which launch the kernel above with IS_KDA=True.\n" \
           "next_power_of_2, cdiv = triton.next_power_of_2, triton.cdiv\n\n\n" + kda + "\n"
    header = f"# Extracted by benchmarks/peers/fetch.py from the {VLLM} wheel ({GDN}, {KDA}); not part of layoutpass.\n"
    (EXT / "vllm_gdn.py").write_text(header + self_contained(gdn, GDN, ("fused_recurrent_gated_delta_rule",)
                                                             + KDA_ENTRIES))


def main():
    (EXT / "wheels").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = zipfile.ZipFile(pip_download(VLLM, Path(tmp)))
        utils = wheel.read(CONSTANTS).decode()
        values = [re.search(rf"^{name} = (-?\d+)$", utils, re.M) for name in ("PAD_SLOT_ID", "NULL_BLOCK_ID")]
        constants = "".join(f"{m.group(0)}\n" for m in values)
        source = standalone(wheel.read(CONV).decode(), constants)
        recurrent_peers(wheel, constants)
    header = f"# Extracted by benchmarks/peers/fetch.py from the {VLLM} wheel ({CONV}); not part of layoutpass.\n"
    (EXT / "vllm_conv.py").write_text(header + source)
    for spec in WHEELS:
        pip_download(spec, EXT / "wheels")
    print(f"wrote {sorted(p.name for p in EXT.glob('*.py'))}, {EXT / 'configs'} and "
          f"{sorted(p.name for p in (EXT / 'wheels').iterdir())}")


if __name__ == "__main__":
    main()
