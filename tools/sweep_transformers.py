"""Hugging Face transformers as users export them, pruned at --ratio 0.3 (issue 15): tiny random-init models
built from their configs, exported by TorchScript (opset 18: Mistral's mask needs bitwise_and), dynamo (opset 18
and 23) with dynamic batch (and sequence) axes, and optimum (its default opset 18, from the model saved with
save_pretrained: no hub access), then analysed and pruned with `--fast` at the analysis shapes below.

Needs `transformers` (not a dependency of spa-prune: `pip install "transformers<4.58"` into the venv running this);
the optimum rows need `pip install optimum-onnx` (optimum 2.1, leaves torch as it is) and read "not installed"
without it.

    python tools/sweep_transformers.py [--models bert,llama] [--exporters torchscript,dynamo18,dynamo23,optimum]
    python tools/sweep_transformers.py --exporters ort-optimized --default-mode   # optimum's export as
        # onnxruntime's transformer optimizer saves it (contrib ops: Attention, EmbedLayerNormalization, ...)
    python tools/sweep_transformers.py --default-mode    # the plain command instead: --target-flops 0.7
    python tools/sweep_transformers.py --models more --exporters torchscript,dynamo18   # other architectures

Prints one markdown row per model and exporter: verification status (or the exit code the command line would
give and the one-line error; any other exception is a bug and says so), the prunable groups' sizes (heads: 4 or,
for grouped-query models, 2 units; MLP: 64), and the MACs before/after.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import logging
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

TEXT = (1, 8)
VISION = (1, 3, 32, 32)
AUDIO = (1, 16, 32)  # whisper encoder: (batch, mel bins, frames = 2 x max_source_positions)


def configs():
    import transformers as t

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    llama_like = dict(common, vocab_size=100, num_key_value_heads=2, max_position_embeddings=64)
    return {
        "bert": (lambda: t.BertModel(t.BertConfig(vocab_size=100, max_position_embeddings=64, **common)), TEXT),
        "roberta": (lambda: t.RobertaModel(t.RobertaConfig(vocab_size=100, max_position_embeddings=66, **common)),
                    TEXT),
        "distilbert": (lambda: t.DistilBertModel(t.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4,
                                                                    hidden_dim=64, max_position_embeddings=64)),
                       TEXT),
        "vit": (lambda: t.ViTModel(t.ViTConfig(image_size=32, patch_size=8, **common)), VISION),
        "deit": (lambda: t.DeiTModel(t.DeiTConfig(image_size=32, patch_size=8, **common)), VISION),
        "whisper-encoder": (lambda: t.WhisperModel(t.WhisperConfig(
            d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16,
            vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
            suppress_tokens=[], begin_suppress_tokens=[])), AUDIO),
        "llama": (lambda: t.LlamaForCausalLM(t.LlamaConfig(**llama_like)), TEXT),
        "qwen2": (lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**llama_like)), TEXT),
        "mistral": (lambda: t.MistralForCausalLM(t.MistralConfig(**llama_like)), TEXT),
        "gpt2": (lambda: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2,
                                                       n_head=4, n_inner=64)), TEXT),
    }


def more_configs():
    """Architectures beyond the issue's list (`--more`): other decoder families, shared weights, vision."""
    import transformers as t

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    text = dict(common, vocab_size=100, max_position_embeddings=64)
    gqa = dict(text, num_key_value_heads=2)
    return {
        "gemma": (lambda: t.GemmaForCausalLM(t.GemmaConfig(head_dim=8, **gqa)), TEXT),
        "qwen3": (lambda: t.Qwen3ForCausalLM(t.Qwen3Config(head_dim=8, **gqa)), TEXT),
        "phi3": (lambda: t.Phi3ForCausalLM(t.Phi3Config(pad_token_id=0, **gqa)), TEXT),
        "stablelm": (lambda: t.StableLmForCausalLM(t.StableLmConfig(**gqa)), TEXT),
        "granite": (lambda: t.GraniteForCausalLM(t.GraniteConfig(**gqa)), TEXT),
        "olmo": (lambda: t.OlmoForCausalLM(t.OlmoConfig(pad_token_id=0, **gqa)), TEXT),
        "gpt_neox": (lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**text)), TEXT),
        "opt": (lambda: t.OPTForCausalLM(t.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    ffn_dim=64, vocab_size=100, max_position_embeddings=64,
                                                    word_embed_proj_dim=32)), TEXT),
        "albert": (lambda: t.AlbertModel(t.AlbertConfig(embedding_size=16, **text)), TEXT),
        "electra": (lambda: t.ElectraModel(t.ElectraConfig(embedding_size=16, **text)), TEXT),
        "swin": (lambda: t.SwinModel(t.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                  num_heads=[2, 4], window_size=4)), VISION),
        "convnext": (lambda: t.ConvNextModel(t.ConvNextConfig(num_channels=3, num_stages=2,
                                                              hidden_sizes=[16, 32], depths=[1, 1],
                                                              image_size=32)), VISION),
        # an encoder-decoder run on its input ids (decoder inputs shifted from them), CLIP's two towers
        "bart": (lambda: t.BartModel(t.BartConfig(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1,
                                                  encoder_attention_heads=4, decoder_attention_heads=4,
                                                  encoder_ffn_dim=64, decoder_ffn_dim=64,
                                                  max_position_embeddings=64)), TEXT),
        "clip-text": (lambda: t.CLIPTextModel(t.CLIPTextConfig(vocab_size=100, max_position_embeddings=64,
                                                               **common)), TEXT),
        "clip-vision": (lambda: t.CLIPVisionModel(t.CLIPVisionConfig(image_size=32, patch_size=8, **common)),
                        VISION),
    }


ENCODER_ONLY = {"whisper-encoder"}   # built whole (optimum needs the whole model), exported as its encoder
# optimum: the task (no past KV cache) and the file it writes for the part swept; otherwise feature-extraction's
# model.onnx, or text-generation's for a causal LM
OPTIMUM = {"whisper-encoder": ("automatic-speech-recognition", "encoder_model.onnx",
                               {"nb_max_frames": AUDIO[2]})}   # else its dummy input has 3000 frames


class NotInstalled(Exception):
    pass


def export(name: str, exporter: str, path: Path) -> None:
    import onnx
    import torch

    build, shape = {**configs(), **more_configs()}[name]
    if exporter == "optimum":
        export_optimum(name, build, path)
        return
    if exporter == "ort-optimized":
        export_optimum(name, build, path)
        optimize_for_onnxruntime(name, path)
        return

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            o = self.m(x, use_cache=False) if "use_cache" in self.m.forward.__code__.co_varnames else self.m(x)
            return o.logits if hasattr(o, "logits") else o.last_hidden_state

    torch.manual_seed(0)
    built = build().eval()
    model = Wrap(built.get_encoder() if name in ENCODER_ONLY else built)
    x = torch.randint(0, 100, shape) if len(shape) == 2 else torch.randn(*shape)
    if exporter == "torchscript":
        axes = {"x": {0: "batch", 1: "seq"} if len(shape) == 2 else {0: "batch"}}
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=18, input_names=["x"],
                          output_names=["y"], dynamic_axes=axes)
    else:
        dims = {0: torch.export.Dim("batch")}
        if len(shape) == 2:
            dims[1] = torch.export.Dim("seq", min=2, max=64)
        torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=int(exporter[len("dynamo"):]),
                          input_names=["x"], output_names=["y"], dynamic_shapes=(dims,))
    m = onnx.load(str(path))
    if m.ir_version > 10:  # onnxruntime 1.32 reads up to IR 11; torch 2.13 writes newer
        m.ir_version = 10
        onnx.save(m, str(path))


def export_optimum(name: str, build, path: Path) -> None:
    """optimum's own export (`main_export`, validation off: it would need the hub's preprocessors) of the model
    saved with save_pretrained, its default opset, no past KV cache."""
    import torch

    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.exporters.onnx") is None:
        raise NotInstalled
    from optimum.exporters.onnx import main_export

    torch.manual_seed(0)
    model = build().eval()
    causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    task, filename, shape_args = OPTIMUM.get(
        name, ("text-generation" if causal else "feature-extraction", "model.onnx", {}))
    folder = path.parent / f"{name}-optimum"
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder / "hf")
    main_export(str(folder / "hf"), str(folder / "onnx"), task=task, do_validation=False, local_files_only=True,
                **shape_args)
    shutil.copyfile(folder / "onnx" / filename, path)


ORT_MODEL_TYPES = {"vit": "vit", "deit": "vit", "gpt2": "gpt2", "bart": "bart", "t5": "t5", "swin": "swin",
                   "clip-text": "clip", "clip-vision": "clip"}


def optimize_for_onnxruntime(name: str, path: Path) -> None:
    """The optimum export as onnxruntime's transformer optimizer saves it (`onnxruntime.transformers.optimizer`,
    what its deployment guides run on a BERT before serving): Attention, EmbedLayerNormalization,
    SkipLayerNormalization, BiasGelu and the like where its fusions match; heads and width detected by it."""
    from onnxruntime.transformers import optimizer

    optimized = optimizer.optimize_model(str(path), model_type=ORT_MODEL_TYPES.get(name, "bert"), num_heads=0,
                                         hidden_size=0, opt_level=0)
    optimized.save_model_to_file(str(path))


def run(name: str, exporter: str, folder: Path, default_mode: bool = False) -> dict:
    import onnx

    from spa import driver
    from spa.errors import one_line

    shape = {**configs(), **more_configs()}[name][1]
    path = folder / f"{name}-{exporter}.onnx"
    row = {"model": name, "exporter": exporter}
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            export(name, exporter, path)
    except NotInstalled:
        return {**row, "status": "not installed"}
    except Exception as e:  # noqa: BLE001 - a row of the table
        return {**row, "status": f"export failed: {one_line(e, 120)}"}
    # every input at the sweep's shape: optimum's text models take attention_mask, token_type_ids or
    # position_ids beside the ids, all (batch, sequence)
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    shapes = {i.name: shape for i in graph.input
              if i.name not in inits and len(i.type.tensor_type.shape.dim) == len(shape)}
    t0 = time.perf_counter()
    try:
        analysis = driver.analyse(driver.load(str(path), input_shapes=shapes))
        row["prunable"] = sorted((g.size for g in analysis.groups if g.prunable), reverse=True)
        cut = {"target_flops": 0.7} if default_mode else {"ratio": 0.3, "fast": True}
        rep = driver.prune(str(path), str(folder / "out.onnx"), input_shapes=shapes, **cut).report
        row.update(status=rep["verification"]["status"], before=rep["macs"]["before"], after=rep["macs"]["after"])
    except Exception as e:  # noqa: BLE001
        code = getattr(e, "exit_code", None)   # SpaError 2, VerificationError 1; anything else: a traceback
        row["status"] = f"exit {code}: {one_line(e, 160)}" if code else f"BUG {type(e).__name__}: {one_line(e, 160)}"
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(configs()),
                    help="comma-separated; 'more' for the architectures beyond the issue's list (more_configs)")
    ap.add_argument("--exporters", default="torchscript,dynamo18,dynamo23,optimum")
    ap.add_argument("--default-mode", action="store_true",
                    help="prune with the plain command's defaults at --target-flops 0.7 (OBS scoring on synthesized "
                         "inputs, reconstruction) instead of --ratio 0.3 --fast")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    print("| model | exporter | status | prunable group sizes | MACs before | MACs after | removed |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        names = ",".join(more_configs()) if args.models == "more" else args.models
        for name in names.split(","):
            for exporter in args.exporters.split(","):
                r = run(name, exporter, Path(tmp), args.default_mode)
                removed = f"{100 * (1 - r['after'] / r['before']):.1f} %" if r.get("before") else ""
                print(f"| {name} | {exporter} | {r['status']} | {r.get('prunable', '')} | {r.get('before', '')} "
                      f"| {r.get('after', '')} | {removed} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
