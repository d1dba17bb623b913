"""``python -m sdtm_kernels quality`` end to end on tiny random pipelines (SD3, PixArt, Flux, DiT)
assembled from configs, saved with ``save_pretrained`` and loaded back by the command from the
folder. Tokenizers are built from vocabularies written here; nothing is downloaded
(``HF_HUB_OFFLINE=1``). 32x32 px, 4 steps, 1-2 prompts."""
import json
import math
import os
import string

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("torchmetrics")
tokenizers = pytest.importorskip("tokenizers")

from sdtm_kernels import cli  # noqa: E402
from sdtm_kernels.quality.inputs import load_error  # noqa: E402

CHARS = string.ascii_lowercase + string.digits + ".,!?'\"-:"


def torchvision_usable():
    try:
        import torchvision  # noqa: F401
    except Exception:  # missing, or broken next to this torch build
        return False
    return True


# -- tiny components ---------------------------------------------------------------------------
def clip_tokenizer(folder):
    """A CLIPTokenizer from a vocabulary of single characters (no merges)."""
    os.makedirs(folder, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump(vocab, fh)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    tok.model_max_length = 77
    return tok, len(vocab)


def t5_tokenizer():
    """A T5TokenizerFast around a Unigram model over single characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in CHARS] + [("\u2581" + c, -1.5) for c in CHARS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", extra_ids=0)
    return fast, len(vocab)


def clip_text(folder, with_projection=True):
    tok, n = clip_tokenizer(folder)
    cfg = transformers.CLIPTextConfig(vocab_size=n, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                      num_hidden_layers=2, projection_dim=32, max_position_embeddings=77,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return cls(cfg), tok


def t5_text(d_model=32):
    tok, n = t5_tokenizer()
    cfg = transformers.T5Config(vocab_size=n, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.T5EncoderModel(cfg), tok


def tiny_vae(latent_channels=4):
    # one block: no downsampling, so a 32 px image is a 32x32 latent (16x16 tokens at patch 2)
    return diffusers.AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                                   layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1,
                                   use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06,
                                   scaling_factor=1.5)


def build_pipeline(kind, folder):
    torch.manual_seed(0)
    if kind == "sd3":
        te, tok = clip_text(folder + "_tok1")
        te2, tok2 = clip_text(folder + "_tok2")
        te3, tok3 = t5_text(d_model=64)  # joint_attention_dim = T5 width = the two CLIP widths together
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4,
            pos_embed_max_size=32)
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(),
            text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3)
    elif kind == "pixart":
        te, tok = t5_text()
        transformer = diffusers.PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=32,
            patch_size=2, cross_attention_dim=16, caption_channels=32, use_additional_conditions=False)
        pipe = diffusers.PixArtSigmaPipeline(tokenizer=tok, text_encoder=te, vae=tiny_vae(), transformer=transformer,
                                             scheduler=diffusers.DPMSolverMultistepScheduler())
    elif kind == "flux":
        te, tok = clip_text(folder + "_tok1", with_projection=False)
        te2, tok2 = t5_text()
        transformer = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
        pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(),
                                      text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2,
                                      transformer=transformer)
    elif kind == "dit":
        transformer = diffusers.DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=32,
            patch_size=2, num_embeds_ada_norm=1000)
        pipe = diffusers.DiTPipeline(transformer=transformer, vae=tiny_vae(),
                                     scheduler=diffusers.DPMSolverMultistepScheduler())
    else:
        raise ValueError(kind)
    pipe.save_pretrained(folder)
    return folder


def build_clip_model(folder):
    """A tiny CLIPModel + CLIPProcessor folder for --clip-model."""
    tok, n = clip_tokenizer(folder)
    text = transformers.CLIPTextConfig(vocab_size=n, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                       num_hidden_layers=1, max_position_embeddings=77, bos_token_id=0,
                                       eos_token_id=1, pad_token_id=1)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                           num_hidden_layers=1, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                           projection_dim=16))
    # the PIL image processor: transformers' default one needs torchvision
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = transformers.CLIPProcessor(image_processor=processor_cls(size={"shortest_edge": 32},
                                                                         crop_size={"height": 32, "width": 32}),
                                           tokenizer=tok)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: huggingface_hub reads HF_HUB_OFFLINE once at import, so its flag is set too."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine idle-spinning
    threads of torch make a 50 ms generation take seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: build_pipeline(kind, str(root / kind)) for kind in ("sd3", "pixart", "flux", "dit")}


def run_quality(tmp_path, folder, *extra, prompts=("a red fox in the snow",)):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("# tiny test prompts\n" + "\n".join(prompts) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    rc = cli.main(["quality", "--pipeline", folder, "--prompts", str(prompt_file), "--steps", "4", "--size", "32",
                   "--warmup", "0", "--no-progress", "--out", str(out), *extra])
    assert rc == 0
    with open(out / "quality.json", encoding="utf-8") as fh:
        return json.load(fh), out


def by_setting(result, name):
    return [r for r in result["images"] if r["setting"] == name]


def check_ratio0_is_unpatched(result):
    for rec in by_setting(result, "ratio 0"):
        assert float(rec["psnr"]) == math.inf and rec["ssim"] == pytest.approx(1.0)
        assert rec["flop_bound_speedup"] == pytest.approx(1.0)
        if rec["lpips"] is not None:
            assert rec["lpips"] == pytest.approx(0.0, abs=1e-6)
    if by_setting(result, "ratio 0")[0]["lpips"] is None:
        assert any(n.startswith("LPIPS unavailable: ") for n in result["notes"]), result["notes"]


def check_files(result, out):
    from PIL import Image

    assert (out / "quality.md").read_text(encoding="utf-8").startswith("# SDTM quality")
    assert len(result["grids"]) == len(result["prompts"])
    for path in result["grids"] + [str(out / "quality_plot.png")] + [r["image"] for r in result["images"]]:
        with Image.open(path) as image:
            assert image.size[0] >= 32


def test_sd3_end_to_end_fidelity_falls_with_the_ratio(tmp_path, folders):
    clip = build_clip_model(str(tmp_path / "clip"))
    result, out = run_quality(tmp_path, folders["sd3"], "--ratios", "0", "0.3", "0.6", "--seeds", "0", "1",
                              "--clip-model", clip, prompts=("a red fox in the snow", "a bowl of ramen"))
    assert result["config"]["pipeline_class"] == "StableDiffusion3Pipeline"
    assert len(result["images"]) == 2 * 2 * 4  # prompts x seeds x (unpatched + 3 ratios)
    check_ratio0_is_unpatched(result)
    low, high = by_setting(result, "ratio 0.3+/-0.2"), by_setting(result, "ratio 0.6+/-0.2")
    for a, b in zip(low, high):  # same prompt and seed: more merging, less fidelity
        assert (a["prompt_index"], a["seed"]) == (b["prompt_index"], b["seed"])
        assert math.isfinite(a["psnr"]) and a["psnr"] > b["psnr"]
        assert 1.0 < a["flop_bound_speedup"] < b["flop_bound_speedup"]
        assert a["mean_tokens"] > b["mean_tokens"]
    means = {s["name"]: s for s in result["settings"]}
    assert means["ratio 0.3+/-0.2"]["psnr"] > means["ratio 0.6+/-0.2"]["psnr"]
    assert float(means["ratio 0"]["psnr"]) == math.inf
    assert all(isinstance(r["clip_score"], float) for r in result["images"])
    assert not any(n.startswith("CLIP score not computed") for n in result["notes"])
    if not torchvision_usable():
        assert any("LPIPS unavailable" in n and "torchvision" in n for n in result["notes"])
    env = result["environment"]
    assert env["torch"] == torch.__version__ and env["torchmetrics"] and "quality" in result["command"]
    check_files(result, out)


@pytest.mark.parametrize("kind", ["pixart", "flux", "dit"])
def test_other_families_end_to_end(tmp_path, folders, kind):
    prompts = ("207",) if kind == "dit" else ("a watercolor lighthouse",)
    result, out = run_quality(tmp_path, folders[kind], "--ratios", "0", "0.3", "0.6", prompts=prompts)
    check_ratio0_is_unpatched(result)
    low, high = by_setting(result, "ratio 0.3+/-0.2")[0], by_setting(result, "ratio 0.6+/-0.2")[0]
    assert math.isfinite(high["psnr"]) and low["psnr"] > high["psnr"]
    assert 1.0 < low["flop_bound_speedup"] < high["flop_bound_speedup"]
    assert any(n.startswith("CLIP score not computed") for n in result["notes"])
    if kind == "dit":
        assert result["prompts"] == [{"text": "a photo of a golden retriever", "class_id": 207}]
    check_files(result, out)


def one_line_error(capsys, argv):
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err.startswith("sdtm quality: error: "), err
    return err


def test_unloadable_pipelines_fail_with_one_line(tmp_path, capsys, monkeypatch):
    err = one_line_error(capsys, ["quality", "--pipeline", str(tmp_path / "missing") + "/", "--out", str(tmp_path)])
    assert "no such folder" in err
    err = one_line_error(capsys, ["quality", "--pipeline", "sdtm-test/not-a-real-pipeline", "--out", str(tmp_path)])
    assert "cannot download" in err and "HF_HUB_OFFLINE" in err
    (tmp_path / "broken").mkdir()
    err = one_line_error(capsys, ["quality", "--pipeline", str(tmp_path / "broken"), "--out", str(tmp_path)])
    assert "from_pretrained failed" in err
    err = one_line_error(capsys, ["quality", "--pipeline", "x", "--ratios", "1.5", "--out", str(tmp_path)])
    assert "[0, 1)" in err
    monkeypatch.setitem(__import__("sys").modules, "torchmetrics", None)  # the extra is not installed
    err = one_line_error(capsys, ["quality", "--pipeline", "x", "--out", str(tmp_path)])
    assert "pip install 'sdtm_kernels[quality]'" in err


def test_load_error_names_gated_repos_and_missing_packages():
    gated = OSError("You are trying to access a gated repo. Make sure to have access to it.")
    assert "gated Hub repository" in load_error("org/model", gated)
    missing = ModuleNotFoundError("No module named 'transformers'", name="transformers")
    wrapped = ValueError("cannot load text_encoder")
    wrapped.__cause__ = missing
    message = load_error("org/model", wrapped)
    assert "'transformers'" in message and "pip install" in message and "\n" not in message
