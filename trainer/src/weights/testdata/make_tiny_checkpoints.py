"""Writes the tiny checkpoints used by the weights tests (run with the project venv's python).

tiny ViT: embed_dim 16, depth 2, 2 heads, patch 14, img_size 28 (2x2 grid), mlp_ratio 1,
LayerScale, 1 register token; trained-style layout with block_chunks=2.
"""
from collections import OrderedDict

import torch
from safetensors.torch import save_file

torch.manual_seed(0)
D, H = 16, 16
shapes = OrderedDict(
    cls_token=(1, 1, D), pos_embed=(1, 5, D), register_tokens=(1, 1, D), mask_token=(1, D),
    **{"patch_embed.proj.weight": (D, 3, 14, 14), "patch_embed.proj.bias": (D,)},
)
for i in range(2):
    for name, shape in [("norm1.weight", (D,)), ("norm1.bias", (D,)), ("attn.qkv.weight", (3 * D, D)),
                        ("attn.qkv.bias", (3 * D,)), ("attn.proj.weight", (D, D)), ("attn.proj.bias", (D,)),
                        ("ls1.gamma", (D,)), ("norm2.weight", (D,)), ("norm2.bias", (D,)),
                        ("mlp.fc1.weight", (H, D)), ("mlp.fc1.bias", (H,)), ("mlp.fc2.weight", (D, H)),
                        ("mlp.fc2.bias", (D,)), ("ls2.gamma", (D,))]:
        shapes[f"blocks.{i}.{name}"] = shape
shapes["norm.weight"] = (D,)
shapes["norm.bias"] = (D,)

flat = OrderedDict((k, torch.randn(s)) for k, s in shapes.items())
# A non-contiguous tensor exercises the stride handling of the reader.
flat["blocks.0.attn.proj.weight"] = torch.randn(D, D).t()
save_file({k: v.contiguous() for k, v in flat.items()}, "tiny_backbone.safetensors")
torch.save(flat, "tiny_hub_backbone.pth")

# Official training layout: {"teacher": state_dict} with chunked blocks (block_chunks=2), plus
# head weights and a non-tensor entry.
teacher = OrderedDict()
for k, v in flat.items():
    if k.startswith("blocks."):
        i = int(k.split(".")[1])
        k = f"blocks.{i}.{k[len('blocks.'):]}"  # chunk i holds block i when depth == block_chunks
    teacher["backbone." + k] = v
teacher["dino_head.last_layer.weight_g"] = torch.ones(8, 1)
torch.save({"teacher": teacher, "iteration": 7}, "tiny_teacher_checkpoint.pth")
