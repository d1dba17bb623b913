"""Inputs of the quality command: prompts (or DiT class labels), SDTM settings and the pipeline,
each checked up front with a one-line error that names the cause and the fix."""
import dataclasses
import os
import warnings

import torch

from ..bench.pipeline import looks_like_path
from .metrics import one_line

# Varied on purpose: photo, food, composition, painting style, faces, night/neon, text rendering, 3D.
DEFAULT_PROMPTS = (
    "a photo of a red fox sitting in fresh snow at golden hour, highly detailed",
    "a bowl of ramen with a soft-boiled egg and scallions, overhead shot",
    "an astronaut riding a horse on the moon, digital art",
    "a watercolor painting of a lighthouse on a rocky coast",
    "a close-up portrait of an elderly man with a white beard, studio lighting",
    "a futuristic city skyline at night with neon signs in the rain",
    'a wooden street sign that reads "SDTM" in bold letters',
    "a cozy living room with a fireplace and a sleeping cat, isometric 3d render",
)
# DiT is class-conditional (ImageNet-1k): the classes of the DiT paper's samples.
DEFAULT_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)
IMAGENET_NAMES = {207: "golden retriever", 360: "otter", 387: "lesser panda", 974: "geyser", 88: "macaw",
                  979: "valley", 417: "balloon", 279: "arctic fox"}


class QualityError(Exception):
    """A user-facing error of the quality command (one line, exit code 2)."""


# -- prompts -----------------------------------------------------------------------------------
def read_prompt_file(path):
    """Non-empty lines of ``path`` that do not start with ``#``."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as fh:
            lines = [line.strip() for line in fh]
    except OSError as exc:
        raise QualityError(f"--prompts {path}: cannot read it ({one_line(exc)}); pass a text file, one prompt a line")
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise QualityError(f"--prompts {path}: no prompts in it (one prompt a line; '#' lines are skipped)")
    return prompts


def is_class_conditional(pipe):
    """DiT-style pipelines take ``class_labels`` instead of a prompt."""
    import inspect

    params = inspect.signature(type(pipe).__call__).parameters
    return "class_labels" in params and "prompt" not in params


def class_prompts(pipe, lines):
    """DiT: each line is an ImageNet class id or a label the pipeline knows (``pipe.labels``,
    from the pipeline's ``id2label``). The text (for CLIP score and the report) is the label."""
    labels = dict(getattr(pipe, "labels", None) or {})
    names = dict(IMAGENET_NAMES)
    for label, index in labels.items():
        names.setdefault(index, label)
    num_classes = getattr(pipe.transformer.config, "num_embeds_ada_norm", None) or 1000
    prompts = []
    for line in lines:
        text = str(line).strip()
        if text.lstrip("-").isdigit():
            index = int(text)
        elif text in labels:
            index = labels[text]
        else:
            known = f"e.g. {', '.join(sorted(labels)[:3])}" if labels else "this pipeline has no id2label table"
            raise QualityError(f"class label {text!r} is unknown to this class-conditional pipeline: use an ImageNet "
                               f"class id (0-{num_classes - 1}) or a label it knows ({known})")
        if not 0 <= index < num_classes:
            raise QualityError(f"class id {index} is outside this DiT's {num_classes} classes (0-{num_classes - 1})")
        name = names.get(index, f"class {index}")
        article = "an" if name[:1].lower() in "aeiou" else "a"
        prompts.append({"text": f"a photo of {article} {name}", "class_id": index})
    return prompts


def resolve_prompts(pipe, args):
    lines = read_prompt_file(args.prompts) if args.prompts else None
    if is_class_conditional(pipe):
        return class_prompts(pipe, lines or DEFAULT_CLASSES)
    return [{"text": text} for text in (lines or DEFAULT_PROMPTS)]


# -- SDTM settings -----------------------------------------------------------------------------
@dataclasses.dataclass
class Setting:
    """One SDTM configuration to compare with the unpatched pipeline."""

    name: str
    preset: str
    options: dict

    def describe(self):
        from ..dit.config import make_config

        config = dataclasses.asdict(make_config(self.preset, **self.options))
        config.pop("num_steps", None)
        return {"name": self.name, "preset": self.preset, "options": dict(self.options), "config": config}


def build_settings(args):
    """Settings from ``--presets`` and ``--ratios`` (default: the presets "released" and "fast").
    A ``--ratios`` entry uses the "released" preset with that ratio and ``--deviation``, capped
    so that the schedule stays within [0, 1)."""
    from ..dit.config import PRESETS, make_config

    presets = args.presets if args.presets is not None else ([] if args.ratios else ["released", "fast"])
    settings = []
    for preset in presets:
        if preset not in PRESETS:
            raise QualityError(f"--presets {preset}: unknown preset; choose from {', '.join(sorted(PRESETS))}")
        settings.append(Setting(preset, preset, {}))
    for ratio in args.ratios or []:
        if not 0.0 <= ratio < 1.0:
            raise QualityError(f"--ratios {ratio:g}: a ratio must be in [0, 1) (0 = merging off)")
        deviation = max(0.0, min(args.deviation, ratio, round(0.99 - ratio, 6)))
        options = {"ratio": float(ratio), "deviation": float(deviation)}
        name = f"ratio {ratio:g}" + (f"+/-{deviation:g}" if ratio > 0 and deviation > 0 else "")
        settings.append(Setting(name, "released", options))
    for setting in settings:
        if args.backend:
            setting.options["backend"] = args.backend
        try:
            make_config(setting.preset, **setting.options)
        except (TypeError, ValueError) as exc:
            raise QualityError(f"setting {setting.name}: {one_line(exc)}") from exc
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise QualityError(f"settings repeat: {', '.join(names)}")
    return settings


# -- the pipeline ------------------------------------------------------------------------------
def _chain(exc):
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _hub_error_types():
    try:
        from huggingface_hub import errors
    except ImportError:
        return (), (), ()
    pick = lambda *names: tuple(t for t in (getattr(errors, n, None) for n in names) if t is not None)  # noqa: E731
    return (pick("GatedRepoError"), pick("RepositoryNotFoundError"),
            pick("LocalEntryNotFoundError", "OfflineModeIsEnabled"))


def load_error(name, exc):
    """The one-line message for a pipeline that did not load."""
    gated, missing_repo, offline = _hub_error_types()
    chain = _chain(exc)
    text = " ".join(" ".join(str(e).split()) for e in chain).lower()
    if any(isinstance(e, gated) for e in chain) or "gated repo" in text:
        return (f"--pipeline {name} is a gated Hub repository: accept its license on https://huggingface.co/{name} "
                "and log in (hf auth login, or HF_TOKEN), or pass a local folder saved with save_pretrained")
    for e in chain:
        if isinstance(e, ImportError):
            module = getattr(e, "name", None) or "a missing package"
            return (f"--pipeline {name} needs the Python package {module!r} ({one_line(e, 120)}): "
                    "pip install 'sdtm_kernels[quality]'")
    for package in ("transformers", "sentencepiece", "protobuf", "accelerate"):
        if f"requires the {package}" in text or f"install {package}" in text or f"`{package}` library" in text:
            return f"--pipeline {name} needs {package}: pip install 'sdtm_kernels[quality]' {package}"
    if any(isinstance(e, missing_repo) for e in chain):
        return (f"--pipeline {name}: no such Hub repository (or a private one: log in with hf auth login) and no "
                "such local folder")
    network_types = ("Connect", "Timeout", "gaierror", "OfflineMode", "ProxyError")
    if any(isinstance(e, offline) or any(w in type(e).__name__ for w in network_types) for e in chain) or any(
            w in text for w in ("offline", "outgoing traffic has been disabled", "not fully cached locally",
                                "name or service not known", "failed to resolve", "max retries", "timed out",
                                "couldn't connect", "cannot find the requested files in the local cache")):
        return (f"--pipeline {name}: cannot download it (no network, or HF_HUB_OFFLINE=1) and it is not in the local "
                f"Hugging Face cache: download it once with network access (hf download {name}) or pass a local "
                "folder saved with save_pretrained")
    return (f"--pipeline {name}: diffusers from_pretrained failed ({one_line(exc)}); pass a diffusers pipeline "
            "folder or Hub id")


def load_pipeline(name, device, dtype):
    """``DiffusionPipeline.from_pretrained(name)`` on ``device``; ``QualityError`` when it fails."""
    path = os.path.expanduser(name)
    if not os.path.exists(path) and looks_like_path(name):
        raise QualityError(f"--pipeline {name}: no such folder (pass a folder saved with save_pretrained or a Hub id "
                           "such as stabilityai/stable-diffusion-3-medium-diffusers)")
    try:
        from diffusers import DiffusionPipeline
    except ImportError as exc:
        raise QualityError("the quality command needs diffusers: pip install 'sdtm_kernels[quality]'") from exc
    try:
        with warnings.catch_warnings():  # newer diffusers call it dtype; torch_dtype works on every version
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(path if os.path.exists(path) else name, torch_dtype=dtype)
    except Exception as exc:  # hub, network, missing extras, broken folders: all end here, on one line
        raise QualityError(load_error(name, exc)) from exc
    if not isinstance(getattr(pipe, "transformer", None), torch.nn.Module):
        raise QualityError(f"--pipeline {name}: {type(pipe).__name__} has no .transformer (SDTM patches diffusion "
                           "transformers: SD3, PixArt, Flux, DiT)")
    try:
        pipe = pipe.to(device)
    except Exception as exc:
        raise QualityError(f"--pipeline {name}: cannot move it to {device} ({one_line(exc)})") from exc
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)  # the command prints one line per image instead
    return pipe
