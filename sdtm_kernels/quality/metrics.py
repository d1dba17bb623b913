"""Fidelity of an SDTM image against the unpatched image (PSNR, SSIM, LPIPS) and CLIP score of
an image against its prompt, all from torchmetrics.

LPIPS needs torchvision (its backbone) and the backbone's ImageNet weights; when either is
missing the metric is replaced by a note ("LPIPS unavailable: <reason>") instead of an error,
so that PSNR / SSIM still come out. With ``HF_HUB_OFFLINE=1`` (or ``offline=True``) the
backbone weights are only used when they already sit in the torch hub cache: nothing is
downloaded.
"""
import math
import os
import sys

import torch

LPIPS_NETS = ("alex", "vgg", "squeeze")
# torchmetrics' LPIPS backbones -> the torchvision weights enum it loads (DEFAULT entry)
_TORCHVISION_WEIGHTS = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}


class MetricsUnavailable(Exception):
    """A metric library is missing (the message says which and how to install it)."""


def offline_mode():
    """Whether the Hugging Face offline switch is on (then nothing may be downloaded): the
    environment, or huggingface_hub's own flag (read once at its import) when it is loaded."""
    if any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
           for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def one_line(exc, limit=240):
    """``Type: message`` of an exception on one line (hub errors span many lines)."""
    text = " ".join(str(exc).split()) or "no message"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


def image_tensor(image):
    """PIL image -> float tensor ``[1, 3, H, W]`` in [0, 1] (the metrics' input)."""
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def _require_torchmetrics():
    try:
        import torchmetrics  # noqa: F401
    except ImportError as exc:
        raise MetricsUnavailable(
            "the quality command needs torchmetrics (and transformers for text-to-image pipelines): "
            "pip install 'sdtm_kernels[quality]'") from exc


def _lpips_weights_cached(net):
    """(cached?, path) of the torchvision backbone weights LPIPS would load."""
    import torchvision

    weights = getattr(torchvision.models, _TORCHVISION_WEIGHTS[net]).DEFAULT
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    return os.path.exists(path), path


def build_lpips(net, device, offline=None):
    """``(metric, None)`` or ``(None, "LPIPS unavailable: <reason>")``."""
    if net in (None, "none"):
        return None, "LPIPS unavailable: switched off (--lpips-net none)"
    offline = offline_mode() if offline is None else offline
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        if offline:
            cached, path = _lpips_weights_cached(net)
            if not cached:
                return None, (f"LPIPS unavailable: offline (HF_HUB_OFFLINE=1) and torchvision's {net} weights are "
                              f"not in the torch hub cache ({path}); run once online or copy them there")
        # normalize=True: inputs in [0, 1] (the metric rescales them to [-1, 1] itself)
        metric = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True).to(device).eval()
        probe = torch.rand(1, 3, 32, 32, device=device)
        with torch.no_grad():
            metric(probe, probe)  # surfaces a broken install now, not after the generations
        metric.reset()
    except ModuleNotFoundError as exc:
        if "torchvision" not in str(exc):
            return None, f"LPIPS unavailable: {one_line(exc)}"
        return None, ("LPIPS unavailable: torchvision is not installed (LPIPS needs its pretrained backbone; "
                      "install the torchvision build that matches your torch)")
    except Exception as exc:  # torchvision broken next to this torch, weights not downloadable
        return None, f"LPIPS unavailable: {one_line(exc)}"
    return metric, None


class FidelityMetrics:
    """PSNR (dB), SSIM and LPIPS of an image against a reference image (both PIL)."""

    def __init__(self, device="cpu", lpips_net="alex", offline=None):
        _require_torchmetrics()
        from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

        # PSNR / SSIM on the CPU: the images are small next to the model, and CPU results do
        # not depend on the GPU's reduction order
        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.device = torch.device(device)
        self.lpips, self.lpips_note = build_lpips(lpips_net, self.device, offline)
        self.lpips_net = lpips_net if self.lpips is not None else None
        self.notes = [] if self.lpips_note is None else [self.lpips_note]

    def compare(self, reference, image):
        """``{"psnr", "ssim", "lpips"}`` of ``image`` against ``reference`` (lpips None when unavailable)."""
        ref, img = image_tensor(reference), image_tensor(image)
        if ref.shape != img.shape:
            raise ValueError(f"image sizes differ: {tuple(ref.shape)} vs {tuple(img.shape)}")
        out = {"psnr": _scalar(self.psnr, img, ref), "ssim": None, "lpips": None}
        try:
            out["ssim"] = _scalar(self.ssim, img, ref)
        except (RuntimeError, ValueError) as exc:  # images smaller than SSIM's 11 px window
            note = f"SSIM unavailable: {one_line(exc)}"
            if note not in self.notes:
                self.notes.append(note)
        if self.lpips is not None:
            with torch.no_grad():
                out["lpips"] = _scalar(self.lpips, img.to(self.device), ref.to(self.device))
        return out


def _scalar(metric, pred, target):
    with torch.no_grad():
        value = float(metric(pred, target))
    metric.reset()  # one value per image pair, no running mean
    return value


class _FeatureTensors(torch.nn.Module):
    """A CLIP model whose ``get_image_features`` / ``get_text_features`` return tensors:
    transformers >= 5 returns output objects (``pooler_output`` = projected embeddings), while
    torchmetrics' CLIPScore divides the result by its norm."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs):
        return _features(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return _features(self.model.get_text_features(*args, **kwargs))


def _features(out):
    if isinstance(out, torch.Tensor):
        return out
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot read CLIP features from {type(out).__name__}")


class ClipScorer:
    """torchmetrics ``CLIPScore`` with a CLIP model from a Hub id or a local folder.

    torchmetrics only accepts a few hub ids by name, so the model is passed as a loader
    (``model_name_or_path`` may be a callable returning ``(model, processor)``)."""

    def __init__(self, name_or_path, device="cpu"):
        _require_torchmetrics()
        try:
            import transformers  # noqa: F401
        except ImportError as exc:
            raise MetricsUnavailable("--clip-model needs transformers: pip install 'sdtm_kernels[quality]'") from exc
        from torchmetrics.multimodal.clip_score import CLIPScore

        def load():
            from transformers import CLIPModel, CLIPProcessor

            path = os.path.expanduser(name_or_path)
            source = path if os.path.exists(path) else name_or_path
            return _FeatureTensors(CLIPModel.from_pretrained(source).eval()), CLIPProcessor.from_pretrained(source)

        self.name = name_or_path
        self.device = torch.device(device)
        self.metric = CLIPScore(model_name_or_path=load).to(self.device)

    def score(self, image, text):
        """CLIP score (100 * cosine, clipped at 0 by torchmetrics) of a PIL image and its text."""
        pixels = (image_tensor(image)[0] * 255.0).round().to(torch.uint8).to(self.device)
        return _scalar(self.metric, pixels, text)


def mean(values):
    """Mean of the non-None values (inf when any is inf: identical images); None when none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    if any(math.isinf(v) for v in values):
        return math.inf if all(v > 0 for v in values if math.isinf(v)) else math.nan
    return sum(values) / len(values)
