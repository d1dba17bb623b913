"""Outputs of the quality command: ``quality.json``, ``quality.md``, one image grid per prompt
and the speed-versus-fidelity plot."""
import json
import math
import os

GRID_TILE_MIN, GRID_TILE_MAX = 256, 512  # tiles are scaled into this range so that labels fit
DIFF_GAIN = 4.0
LABEL_HEIGHT = 30


def finite_json(value):
    """``value`` with non-finite floats as strings ("inf", "-inf", "nan"): strict JSON
    (identical images have PSNR = inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_json(result, path):
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(finite_json(result), fh, indent=2, allow_nan=False)


def _fmt(value, spec, missing="-"):
    if value is None:
        return missing
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return spec.format(value)


SUMMARY_COLUMNS = (
    ("setting", "name", "{}"), ("images", "images", "{}"), ("wall s", "wall_s", "{:.2f}"),
    ("speedup", "speedup", "{:.2f}x"), ("transformer speedup", "transformer_speedup", "{:.2f}x"),
    ("FLOP-bound", "flop_bound_speedup", "{:.2f}x"), ("tokens/step", "mean_tokens", "{:.0f}"),
    ("PSNR dB", "psnr", "{:.2f}"), ("SSIM", "ssim", "{:.4f}"), ("LPIPS", "lpips", "{:.4f}"),
    ("CLIP", "clip_score", "{:.2f}"),
)
IMAGE_COLUMNS = (
    ("prompt", "prompt_index", "{}"), ("seed", "seed", "{}"), ("setting", "setting", "{}"),
    ("wall s", "wall_s", "{:.3f}"), ("transformer s", "transformer_s", "{:.3f}"),
    ("speedup", "speedup", "{:.2f}x"), ("FLOP-bound", "flop_bound_speedup", "{:.2f}x"),
    ("PSNR dB", "psnr", "{:.2f}"), ("SSIM", "ssim", "{:.4f}"), ("LPIPS", "lpips", "{:.4f}"),
    ("CLIP", "clip_score", "{:.2f}"),
)


def _rows(records, columns):
    return [[_fmt(rec.get(key), spec) for _, key, spec in columns] for rec in records]


def text_table(records, columns=SUMMARY_COLUMNS):
    """A plain-text table (the console summary)."""
    rows = [[h for h, _, _ in columns]] + _rows(records, columns)
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(records, columns):
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    return "\n".join([head, sep] + ["| " + " | ".join(row) + " |" for row in _rows(records, columns)])


def summary_lines(result):
    cfg, env = result["config"], result["environment"]
    lines = [f"pipeline {cfg['pipeline']} ({cfg['pipeline_class']}, {cfg['transformer_class']}), "
             f"{cfg['image_size']} px, steps {cfg['steps']}, {cfg['dtype']}, {len(result['prompts'])} prompt(s) x "
             f"{len(cfg['seeds'])} seed(s); {env['device']}, torch {env['torch']}, diffusers {env.get('diffusers')}, "
             f"torchmetrics {env.get('torchmetrics')}"]
    lines += [f"note: {note}" for note in result["notes"]]
    return lines


def write_markdown(result, path):
    parts = ["# SDTM quality: speed and fidelity vs the unpatched pipeline", "",
             *summary_lines(result), "",
             "Means over all images of each setting; speedups = total unpatched time / total setting time "
             "(wall: whole pipeline call; transformer: its forward calls only). Fidelity is against the unpatched "
             "image of the same prompt and seed; PSNR = inf means identical images.", "",
             markdown_table(result["settings"], SUMMARY_COLUMNS), "",
             "## Prompts", ""]
    parts += [f"{i}. {p['text']}" for i, p in enumerate(result["prompts"])]
    parts += ["", "## Per image", "", markdown_table(result["images"], IMAGE_COLUMNS), "",
              f"Command: `{result['command']}`", ""]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(parts))


# -- images --------------------------------------------------------------------------------------
def _tile_size(size):
    return max(GRID_TILE_MIN, min(GRID_TILE_MAX, size))


def _labelled(image, label, tile):
    from PIL import Image, ImageDraw

    resample = Image.NEAREST if image.width < tile else Image.LANCZOS  # tiny images: keep the pixels visible
    body = image.convert("RGB").resize((tile, round(tile * image.height / image.width)), resample)
    canvas = Image.new("RGB", (tile, body.height + LABEL_HEIGHT), "white")
    canvas.paste(body, (0, LABEL_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(label.split("\n")[:2]):
        draw.text((4, 2 + 13 * i), line, fill="black")
    return canvas


def difference_map(reference, image, gain=DIFF_GAIN):
    """``|image - reference| * gain`` per channel, as a PIL image."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.clip(_abs_diff(reference, image) * gain, 0, 255).astype(np.uint8))


def _abs_diff(reference, image):
    import numpy as np

    a = np.asarray(reference.convert("RGB"), dtype=np.float32)
    b = np.asarray(image.convert("RGB"), dtype=np.float32)
    return np.abs(a - b)


def grid_gain(rows):
    """One gain per grid, so that the settings' maps compare: at least ``DIFF_GAIN``, raised (up to
    64x, in powers of 2) until the largest difference reaches about 3/4 of white."""
    largest = max([float(_abs_diff(base, img).max()) for _, base, others in rows for _, img, _ in others] or [0.0])
    gain = DIFF_GAIN
    while gain < 64 and largest * gain * 2 <= 192:
        gain *= 2
    return gain


def image_grid(rows, path):
    """One grid per prompt. ``rows``: per seed ``(seed, baseline, [(setting, image, metrics), ...])``;
    each seed gives an image row (unpatched | settings) and a difference row under it."""
    from PIL import Image

    tile = _tile_size(rows[0][1].width)
    gain = grid_gain(rows)
    lines = []
    for seed, baseline, others in rows:
        top = [_labelled(baseline, f"unpatched\nseed {seed}", tile)]
        bottom = [None]
        for name, image, metrics in others:
            psnr = metrics.get("psnr")
            fidelity = ("identical (PSNR inf)" if psnr is not None and math.isinf(psnr) else
                        f"PSNR {_fmt(psnr, '{:.1f}')} dB, SSIM {_fmt(metrics.get('ssim'), '{:.4f}')}")
            top.append(_labelled(image, f"{name}\n{fidelity}", tile))
            bottom.append(_labelled(difference_map(baseline, image, gain), f"|{name} - unpatched| x{gain:g}", tile))
        lines += [top, bottom]
    height = sum(max(t.height for t in line if t is not None) for line in lines)
    grid = Image.new("RGB", (tile * len(lines[0]), height), "white")
    y = 0
    for line in lines:
        for x, tile_image in enumerate(line):
            if tile_image is not None:
                grid.paste(tile_image, (x * tile, y))
        y += max(t.height for t in line if t is not None)
    grid.save(path)
    return path


def speed_fidelity_plot(settings, path, title=""):
    """Speedup against PSNR (and LPIPS when measured), one labelled point per setting; returns
    the path, or None without matplotlib. Settings whose PSNR is inf (identical to unpatched)
    sit at the top edge with the label "inf"."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [("psnr", "PSNR vs unpatched (dB, higher = closer)")]
    if any(s.get("lpips") is not None for s in settings):
        panels.append(("lpips", "LPIPS vs unpatched (lower = closer)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    sdtm = [s for s in settings if s["name"] != "unpatched"]
    for ax, (key, label) in zip(axes[0], panels):
        finite = [s[key] for s in sdtm if s.get(key) is not None and math.isfinite(s[key])]
        top = (max(finite) + 3.0) if finite else 40.0  # where PSNR = inf points are drawn
        for marker, speed_key, legend in (("o", "flop_bound_speedup", "FLOP-bound speedup"),
                                          ("s", "speedup", "measured speedup (wall)")):
            xs, ys, names = [], [], []
            for s in sdtm:
                if s.get(key) is None or s.get(speed_key) is None:
                    continue
                value = s[key] if math.isfinite(s[key]) else top
                xs.append(s[speed_key])
                ys.append(value)
                names.append(s["name"] + ("" if math.isfinite(s[key]) else " (inf)"))
            if not xs:
                continue
            hollow = dict(facecolors="none", edgecolors="tab:orange") if marker == "s" else dict(color="tab:blue")
            ax.scatter(xs, ys, marker=marker, label=legend, s=40, **hollow)
            for x, y, name in zip(xs, ys, names):
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set(xlabel="speedup vs unpatched (x)", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grid_path(out_dir, prompt_index):
    return os.path.join(out_dir, f"grid_prompt{prompt_index:02d}.png")
