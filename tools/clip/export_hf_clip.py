"""Exports a Hugging Face `CLIPModel` to a Kalon encoder directory: both
towers as ONNX (dynamic batch; the text tower takes `input_ids` and
`attention_mask`), the model's own `tokenizer.json`, and
`kalon-model.json` with its image size and normalisation constants; then
checks the ONNX outputs against transformers' on a few images and texts
(ONNX Runtime, batch 1 and 3), and says so.

    pip install torch transformers onnx onnxruntime tokenizers pillow
    python tools/clip/export_hf_clip.py --model openai/clip-vit-base-patch32 --out my-clip
    kalonctl encoder check --model my-clip

`--model` is a hub name or a local directory saved with `save_pretrained`
(the model, its `preprocessor_config.json` and its tokenizer). Without
network access to the hub, `--config FILE.json` builds a `CLIPConfig` with
random weights from `--seed`, and the tokenizer is built from open_clip's
vocabulary (tools/clip/clip_tokenizer.py; `--open-clip-vocab` names the
file, else the installed open_clip_torch's).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clip_tokenizer import build as build_tokenizer, ids as tokenize  # noqa: E402
from export_open_clip import OPENAI_MEAN, OPENAI_STD, export, pixels, test_images, unit, worst_difference  # noqa: E402


class ImageTower(torch.nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values):
        pooled = self.clip.vision_model(pixel_values=pixel_values).pooler_output
        return self.clip.visual_projection(pooled)


class TextTower(torch.nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids, attention_mask):
        pooled = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return self.clip.text_projection(pooled)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="a hub name or a save_pretrained directory")
    g.add_argument("--config", help="a CLIPConfig JSON (random weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--open-clip-vocab", help="open_clip's bpe_simple_vocab_16e6.txt.gz (with --config)")
    p.add_argument("--out", required=True)
    p.add_argument("--tolerance", type=float, default=1e-5)
    args = p.parse_args()

    import onnxruntime as ort
    import transformers
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    if args.config:
        with open(args.config) as f:
            config = CLIPConfig(**json.load(f))
        config._attn_implementation = "eager"
        clip = CLIPModel(config)
        name = os.path.splitext(os.path.basename(args.config))[0]
        mean, std = OPENAI_MEAN, OPENAI_STD
        vocab = args.open_clip_vocab
        if vocab is None:
            import open_clip
            vocab = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
        tok = build_tokenizer(vocab)
        tok.save(os.path.join(args.out, "tokenizer.json"))
        pad_id = 0
    else:
        from transformers import CLIPImageProcessor, CLIPTokenizerFast
        clip = CLIPModel.from_pretrained(args.model, attn_implementation="eager")
        name = args.model.rstrip("/").split("/")[-1]
        processor = CLIPImageProcessor.from_pretrained(args.model)
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        crop = processor.crop_size.get("height", clip.config.vision_config.image_size) if isinstance(processor.crop_size, dict) else processor.crop_size
        shortest = processor.size.get("shortest_edge", crop) if isinstance(processor.size, dict) else processor.size
        if shortest != crop:
            print(f"note: {name} resizes to {shortest} then crops {crop}; Kalon resizes to {crop} and crops", file=sys.stderr)
        fast = CLIPTokenizerFast.from_pretrained(args.model)
        fast.backend_tokenizer.save(os.path.join(args.out, "tokenizer.json"))
        pad_id = fast.pad_token_id or 0
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(args.out, "tokenizer.json"))
    clip.eval().requires_grad_(False)
    size = clip.config.vision_config.image_size
    context = clip.config.text_config.max_position_embeddings

    image_tower, text_tower = ImageTower(clip).eval(), TextTower(clip).eval()
    example_images = torch.from_numpy(pixels(test_images(size, 2, args.seed), mean, std))
    example_ids = torch.tensor(tokenize(tok, ["a photo", "two dogs"], context, pad_id), dtype=torch.int64)
    example_mask = (torch.arange(context)[None, :] < torch.tensor([[4], [4]])).to(torch.int64)
    with torch.no_grad():
        export(image_tower, example_images, os.path.join(args.out, "image.onnx"), "pixel_values", "image_embeds")
        torch.onnx.export(
            text_tower, (example_ids, example_mask), os.path.join(args.out, "text.onnx"),
            input_names=["input_ids", "attention_mask"], output_names=["text_embeds"],
            dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "text_embeds": {0: "batch"}},
            opset_version=17, dynamo=False,
        )
        dim = int(text_tower(example_ids, example_mask).shape[-1])

    manifest = {
        "format": "kalon-encoder/1",
        "name": name,
        "embedding_dim": dim,
        "image": {"file": "image.onnx", "size": int(size), "mean": list(mean), "std": list(std)},
        "text": {"file": "text.onnx", "max_len": int(context), "vocab": "tokenizer.json",
                 "tokenizer": "clip-bpe", "pad_id": int(pad_id)},
        "notes": {"exported_by": "tools/clip/export_hf_clip.py", "transformers": transformers.__version__,
                  "torch": torch.__version__.split("+")[0], "model": args.model or name, "seed": args.seed},
    }
    with open(os.path.join(args.out, "kalon-model.json"), "w") as f:
        json.dump(manifest, f, indent=2)

    texts = ["a quiet harbour at dusk", "A red bicycle leaning on a wall!", "two dogs", "", "l'été à Paris, 2024"]
    images = test_images(size, 3, args.seed + 1)
    x = pixels(images, mean, std)
    encodings = [tok.encode(t) for t in texts]
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    image_sess = ort.InferenceSession(os.path.join(args.out, "image.onnx"), providers=["CPUExecutionProvider"])
    text_sess = ort.InferenceSession(os.path.join(args.out, "text.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref_image = unit(image_tower(torch.from_numpy(x)).numpy())
        ref_text = unit(text_tower(torch.from_numpy(ids), torch.from_numpy(mask)).numpy())
    worst = worst_difference(image_sess, x, ref_image, text_sess, {"input_ids": ids, "attention_mask": mask}, ref_text)
    result = {"out": args.out, "model": name, "embedding_dim": dim, "image_size": int(size),
              "max_abs_diff": worst, "tolerance": args.tolerance, "parity": worst <= args.tolerance}
    print(json.dumps(result))
    if not result["parity"]:
        sys.exit(f"the ONNX towers differ from transformers by {worst:.2e} > {args.tolerance:.0e}")


if __name__ == "__main__":
    main()
