"""``python -m sdtm_kernels quality``: SDTM speed and fidelity side by side on a real pipeline.

For a diffusers pipeline (Hub id or a folder saved with ``save_pretrained``), prompts (8
built-in ones, or ``--prompts FILE``; DiT: ImageNet class ids) and seeds, it generates the
unpatched image and one image per SDTM setting (``--presets``, ``--ratios``) from the same
seed, and reports per image and on average: PSNR, SSIM and LPIPS against the unpatched image
(torchmetrics; LPIPS only where torchvision and its weights are available, else a note),
the CLIP score against the prompt (``--clip-model``), wall and transformer time with the
speedup, and bench.py's FLOP-bound speedup from the token counts SDTM's blocks saw.

Outputs in ``--out``: ``quality.json``, ``quality.md``, ``images/`` (every image),
``grid_promptNN.png`` (unpatched | settings, with amplified difference maps under them) and
``quality_plot.png`` (speedup against PSNR / LPIPS, one point per setting).

Modules: ``inputs`` (prompts, settings, loading with one-line errors), ``metrics``
(torchmetrics wrappers), ``speed`` (timers, FLOP model), ``report`` (files), ``run`` (the
loop and the command line). Importing this package imports neither diffusers nor torchmetrics.
"""
from .inputs import DEFAULT_CLASSES, DEFAULT_PROMPTS, QualityError
from .run import add_arguments, main, run_args, run_quality

__all__ = ["DEFAULT_CLASSES", "DEFAULT_PROMPTS", "QualityError", "add_arguments", "main", "run_args", "run_quality"]
