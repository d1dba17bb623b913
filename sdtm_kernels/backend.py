"""Backend selection: ``None``/``"auto"``, ``"reference"`` or ``"triton"``.

``auto`` runs the Triton kernels on CUDA tensors where the op has one and the pure-PyTorch
reference otherwise. ``triton`` forces the kernels (on CPU tensors they run in the Triton
interpreter, which needs ``TRITON_INTERPRET=1`` set before triton is first imported).
"""
import importlib.util
import os

BACKENDS = ("auto", "reference", "triton")

# Ops that have a Triton kernel in this release; the rest always run the reference.
TRITON_MERGE_OPS = frozenset({"merge", "prune", "unmerge"})  # csrc_triton/merge.py
TRITON_PLAN_OPS = frozenset({"window_scores", "bipartite_match", "plan_ssm", "plan_idm", "plan_tome"})  # csrc_triton/{scores,match,select}.py
TRITON_ATTENTION_OPS = frozenset({"attention_received"})  # csrc_triton/attention.py
TRITON_OPS = TRITON_MERGE_OPS | TRITON_PLAN_OPS | TRITON_ATTENTION_OPS


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this op here."""


# Looked up once (a module search, not an import): asked on every op call.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def resolve_backend(backend, device, op: str) -> str:
    """The backend that will run ``op`` on ``device``: ``"reference"`` or ``"triton"``."""
    if backend is None:
        backend = "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of None, {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "auto":
        use_triton = op in TRITON_OPS and device.type == "cuda" and triton_installed()
        return "triton" if use_triton else "reference"
    if op not in TRITON_OPS:
        raise BackendUnavailableError(
            f"backend='triton' is not available for {op}: this release has no Triton kernel for it yet; "
            "use backend='reference' or None"
        )
    if not triton_installed():
        raise BackendUnavailableError("backend='triton' needs the triton package, which is not installed")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise BackendUnavailableError(
            f"backend='triton' on a {device.type} tensor runs the Triton interpreter, which needs "
            "TRITON_INTERPRET=1 set before triton is first imported; or use backend='reference'"
        )
    return "triton"
