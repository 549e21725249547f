"""Exports an open_clip model to a Kalon encoder directory: both towers as
ONNX (dynamic batch), the tokenizer as `tokenizer.json`, and
`kalon-model.json` with the model's image size, normalisation constants
and text context; then checks the ONNX outputs against open_clip's own on
a few images and texts (ONNX Runtime, batch 1 and 3), and says so.

    pip install torch open_clip_torch onnx onnxruntime tokenizers pillow
    python tools/clip/export_open_clip.py --model ViT-B-32 --pretrained laion2b_s34b_b79k --out my-clip
    kalonctl encoder check --model my-clip

`--config FILE.json` builds an architecture from an open_clip model config
instead (random weights from `--seed`, as the test fixture is made), and
`--reference` writes `reference.json`: a few PNG images and texts with
open_clip's embeddings of them, for a parity test of Kalon's full path
(image file -> decode -> preprocess -> tower; text -> tokenizer -> tower).

Kalon resizes the shorter side bilinearly and crops the centre; CLIP
models were trained with bicubic resizing, so embeddings of images that
need resizing differ slightly from open_clip's preprocessing (the script
says so). Images already at the model's size are not resampled.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clip_tokenizer import build as build_tokenizer, ids as tokenize  # noqa: E402

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageTower(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.encode_image(pixel_values)


class TextTower(torch.nn.Module):
    """open_clip's encode_text, pooling at the end token (the highest id)
    found with an int32 argmax (ONNX Runtime's CUDA provider has no int64
    ArgMax)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        m = self.model
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(input_ids).to(cast)
        x = x + m.positional_embedding.to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        eot = input_ids.to(torch.int32).argmax(dim=-1)
        x = x[torch.arange(x.shape[0]), eot]
        if m.text_projection is not None:
            x = x @ m.text_projection if not isinstance(m.text_projection, torch.nn.Linear) else m.text_projection(x)
        return x


def load_model(args):
    import open_clip
    torch.manual_seed(args.seed)
    if args.config:
        with open(args.config) as f:
            cfg = json.load(f)
        name = os.path.splitext(os.path.basename(args.config))[0]
        model = open_clip.CLIP(**cfg)
    else:
        name = args.model
        model = open_clip.create_model(args.model, pretrained=args.pretrained or None)
    if getattr(model, "text", None) is not None and not hasattr(model, "token_embedding"):
        sys.exit(f"{name}: its text tower is a Hugging Face model (CustomTextCLIP); this script exports CLIP's own text transformer only")
    model.eval().requires_grad_(False)
    pre = open_clip.get_model_preprocess_cfg(model) if hasattr(open_clip, "get_model_preprocess_cfg") else {}
    return name, model, pre


def export(module, example, path, input_name, output_name):
    torch.onnx.export(
        module, (example,), path,
        input_names=[input_name], output_names=[output_name],
        dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
        opset_version=17, dynamo=False,
    )


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def pixels(images, mean, std):
    """Kalon's preprocessing of `size`x`size` RGB uint8 arrays: /255, minus
    mean, over std, CHW, float32."""
    x = np.stack(images).astype(np.float32) / 255.0
    x = (x - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return x.transpose(0, 3, 1, 2).astype(np.float32)


def test_images(size, n, seed):
    """Smooth random images (gradients and blobs) at the model's size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        c = rng.uniform(0, 1, (3, 3))
        img = np.stack([c[k, 0] * xx + c[k, 1] * yy + c[k, 2] * np.sin(6 * xx * yy + k) for k in range(3)], -1)
        img = (img - img.min()) / (img.max() - img.min() + 1e-9)
        out.append((img * 255).round().astype(np.uint8))
    return out


def worst_difference(image_sess, x, ref_image, text_sess, text_inputs, ref_text):
    """The largest difference between ONNX Runtime's unit vectors and the
    framework's (`ref_*`), run at batch 1 and 3."""
    worst = 0.0
    for b in (1, 3):
        for i in range(0, len(x), b):
            got = unit(image_sess.run(None, {"pixel_values": x[i:i + b]})[0])
            worst = max(worst, float(np.abs(got - ref_image[i:i + b]).max()))
        for i in range(0, len(ref_text), b):
            got = unit(text_sess.run(None, {k: v[i:i + b] for k, v in text_inputs.items()})[0])
            worst = max(worst, float(np.abs(got - ref_text[i:i + b]).max()))
    return worst


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="an open_clip model name, e.g. ViT-B-32")
    g.add_argument("--config", help="an open_clip model config JSON (random weights)")
    p.add_argument("--pretrained", help="open_clip pretrained tag, e.g. laion2b_s34b_b79k (default: random weights)")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and of the check's inputs")
    p.add_argument("--out", required=True, help="the encoder directory to write")
    p.add_argument("--reference", action="store_true", help="also write reference.json and its images")
    p.add_argument("--tolerance", type=float, default=1e-5, help="the parity check's max abs difference of unit vectors")
    args = p.parse_args()

    import onnxruntime as ort
    import open_clip
    from PIL import Image

    torch.backends.mha.set_fastpath_enabled(False)
    name, model, pre = load_model(args)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = tuple(pre.get("mean", OPENAI_MEAN))
    std = tuple(pre.get("std", OPENAI_STD))
    context = model.context_length
    if pre.get("interpolation", "bicubic") != "bilinear" or pre.get("resize_mode", "shortest") != "shortest":
        print(f"note: {name} was trained with {pre.get('interpolation', 'bicubic')} resizing "
              f"({pre.get('resize_mode', 'shortest')}); Kalon resizes bilinearly (images already "
              f"{size}x{size} are not resampled)", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)

    # the tokenizer, from open_clip's own vocabulary file
    vocab = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    tok = build_tokenizer(vocab)
    tok.save(os.path.join(args.out, "tokenizer.json"))

    image_tower, text_tower = ImageTower(model).eval(), TextTower(model).eval()
    # trace with batch 2 so no dimension is specialised to 1
    example_images = torch.from_numpy(pixels(test_images(size, 2, args.seed), mean, std))
    example_ids = torch.tensor(tokenize(tok, ["a photo", "two dogs"], context), dtype=torch.int64)
    with torch.no_grad():
        export(image_tower, example_images, os.path.join(args.out, "image.onnx"), "pixel_values", "image_embeds")
        export(text_tower, example_ids, os.path.join(args.out, "text.onnx"), "input_ids", "text_embeds")
        dim = int(text_tower(example_ids).shape[-1])

    manifest = {
        "format": "kalon-encoder/1",
        "name": name,
        "embedding_dim": dim,
        "image": {"file": "image.onnx", "size": int(size), "mean": list(mean), "std": list(std)},
        "text": {"file": "text.onnx", "max_len": int(context), "vocab": "tokenizer.json",
                 "tokenizer": "clip-bpe", "pad_id": 0},
        "notes": {
            "exported_by": "tools/clip/export_open_clip.py",
            "open_clip": open_clip.__version__, "torch": torch.__version__.split("+")[0],
            "model": name, "pretrained": args.pretrained, "seed": args.seed,
        },
    }
    with open(os.path.join(args.out, "kalon-model.json"), "w") as f:
        json.dump(manifest, f, indent=2)

    # parity: ONNX Runtime against open_clip, batch 1 and 3
    texts = ["a quiet harbour at dusk", "A red bicycle leaning on a wall!", "two dogs", "", "l'été à Paris, 2024"]
    images = test_images(size, 3, args.seed + 1)
    image_sess = ort.InferenceSession(os.path.join(args.out, "image.onnx"), providers=["CPUExecutionProvider"])
    text_sess = ort.InferenceSession(os.path.join(args.out, "text.onnx"), providers=["CPUExecutionProvider"])
    x = pixels(images, mean, std)
    ids = np.array(tokenize(tok, texts, context), dtype=np.int64)
    with torch.no_grad():
        ref_image = unit(model.encode_image(torch.from_numpy(x)).numpy())
        ref_text = unit(model.encode_text(torch.from_numpy(ids)).numpy())
    worst = worst_difference(image_sess, x, ref_image, text_sess, {"input_ids": ids}, ref_text)
    result = {"out": args.out, "model": name, "embedding_dim": dim, "image_size": int(size),
              "max_abs_diff": worst, "tolerance": args.tolerance, "parity": worst <= args.tolerance}

    if args.reference:
        names = []
        for i, img in enumerate(images):
            file = f"reference-{i}.png"
            Image.fromarray(img).save(os.path.join(args.out, file))
            names.append(file)
        with open(os.path.join(args.out, "reference.json"), "w") as f:
            json.dump({
                "note": "open_clip's unit embeddings of these PNG files (Kalon's preprocessing: /255, mean, std) and texts",
                "images": [{"file": n, "embedding": e.tolist()} for n, e in zip(names, ref_image)],
                "texts": [{"text": t, "ids": i.tolist(), "embedding": e.tolist()} for t, i, e in zip(texts, ids, ref_text)],
            }, f)
    print(json.dumps(result))
    if not result["parity"]:
        sys.exit(f"the ONNX towers differ from open_clip by {worst:.2e} > {args.tolerance:.0e}")


if __name__ == "__main__":
    main()
