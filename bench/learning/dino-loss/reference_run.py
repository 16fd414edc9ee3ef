#!/usr/bin/env python3
"""Runs the official DINOv2 training step (facebookresearch/dinov2) on CPU on the tiny
Fashion-MNIST setup of manifests/examples/tiny-cpu-fashion-mnist.yaml and writes its loss
curve, so it can be laid beside Dinoflow's.

The reference is imported from a checkout given on the command line, not copied:

    git -C "$MIRROR" archive HEAD dinov2 | tar x -C /tmp/dinov2-src
    python3 reference_run.py /tmp/dinov2-src out.csv [--iterations 300]

What is the reference's own code: the config (ssl_default_config.yaml plus the manifest's
overrides), the ViT and its blocks, DINOHead, SSLMetaArch.forward_backward (teacher targets,
centering, DINO/iBOT/KoLeo losses), the param groups, build_optimizer, build_schedulers,
apply_optim_scheduler, DataAugmentationDINO, MaskingGenerator and collate_data_and_cast.
What this file supplies, because the reference needs a GPU, FSDP and xFormers for them:
- the training loop body of train.py's do_train, minus FSDP and checkpointing: clipping per
  student submodule with torch.nn.utils.clip_grad_norm_ (FSDP's is the same maths on one
  process) and the teacher EMA over the parameters (update_teacher walks FSDP modules only);
- nested-tensor blocks run crop set by crop set (what xFormers' block-diagonal attention
  computes), and the heads' BlockDiagonalMask cat/split as a plain cat/split;
- the dataset: Fashion-MNIST idx files as RGB PIL images, shuffled without replacement;
- the normalisation: the manifest's grayscale statistics (0.286, 0.353) replace ImageNet's.
"""

import argparse
import csv
import gzip
import os
import random
import sys
import types

os.environ["XFORMERS_DISABLED"] = "1"
sys.path.append("/usr/lib/python3/dist-packages")  # PyYAML for the official config file


def install_stubs():
    """Modules the reference imports for GPU training only."""
    import torch
    import yaml

    class AttrDict(dict):
        def __getattr__(self, k):
            try:
                return self[k]
            except KeyError as e:
                raise AttributeError(k) from e

        def __setattr__(self, k, v):
            self[k] = v

    def wrap(v):
        if isinstance(v, dict):
            return AttrDict({k: wrap(x) for k, x in v.items()})
        return v

    omegaconf = types.ModuleType("omegaconf")
    omegaconf.OmegaConf = types.SimpleNamespace(
        load=lambda p: wrap(yaml.safe_load(open(p))),
        create=lambda d: wrap(dict(d)),
        merge=lambda *ds: None,
    )
    sys.modules["omegaconf"] = omegaconf
    fvcore = types.ModuleType("fvcore")
    common = types.ModuleType("fvcore.common")
    ckpt = types.ModuleType("fvcore.common.checkpoint")
    ckpt.Checkpointer = object
    ckpt.PeriodicCheckpointer = object
    sys.modules.update(
        {"fvcore": fvcore, "fvcore.common": common, "fvcore.common.checkpoint": ckpt}
    )

    class BlockDiagonalMask:
        """cat along the token axis, split back: the heads are per-token MLPs."""

        def __init__(self, sizes):
            self.sizes = sizes

        @classmethod
        def from_tensor_list(cls, tensors):
            return cls([t.shape[1] for t in tensors]), torch.cat(tensors, dim=1)

        def split(self, x):
            return list(x.split(self.sizes, dim=1))

    xformers = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")
    ops.fmha = types.SimpleNamespace(BlockDiagonalMask=BlockDiagonalMask)
    xformers.ops = ops
    sys.modules.update({"xformers": xformers, "xformers.ops": ops})
    torch.Tensor.cuda = lambda self, *a, **k: self  # CPU run
    return wrap


def read_idx(path, offset):
    import numpy as np

    return np.frombuffer(gzip.open(path, "rb").read(), np.uint8, offset=offset)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src", help="directory holding the reference's dinov2/ package")
    ap.add_argument("out", help="CSV of per-iteration losses")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=29533, help="of the one-process gloo group")
    ap.add_argument(
        "--data",
        default="/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        help="extra override section.key=value (YAML value), applied after the manifest's",
    )
    args = ap.parse_args()

    wrap = install_stubs()
    sys.path.insert(0, args.src)
    import numpy as np
    import torch
    import yaml
    from functools import partial
    from PIL import Image
    from torchvision import transforms

    torch.set_num_threads(1)
    # iBOTPatchLoss.sinkhorn_knopp_teacher all-reduces unconditionally: a one-process group.
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=0, world_size=1
    )
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)

    import dinov2.data.augmentations as aug
    import dinov2.layers.block as block
    import dinov2.models.vision_transformer as vits
    from dinov2.configs import dinov2_default_config
    from dinov2.data import MaskingGenerator, collate_data_and_cast
    from dinov2.train.ssl_meta_arch import SSLMetaArch
    from dinov2.train.train import apply_optim_scheduler, build_optimizer, build_schedulers
    from dinov2.utils.config import apply_scaling_rules_to_cfg

    # The manifest's model: a 4-block ViT, width 64, 4 heads, patch 7.
    def vit_tiny_fmnist(patch_size=7, num_register_tokens=0, **kw):
        return vits.DinoVisionTransformer(
            patch_size=patch_size,
            embed_dim=64,
            depth=4,
            num_heads=4,
            mlp_ratio=4,
            block_fn=partial(block.NestedTensorBlock, attn_class=vits.MemEffAttention),
            num_register_tokens=num_register_tokens,
            **kw,
        )

    vits.vit_tiny_fmnist = vit_tiny_fmnist
    plain_forward = block.Block.forward
    block.NestedTensorBlock.forward = lambda self, x: (
        [plain_forward(self, t) for t in x] if isinstance(x, list) else plain_forward(self, x)
    )
    aug.make_normalize_transform = lambda: transforms.Normalize((0.286,) * 3, (0.353,) * 3)

    cfg = wrap(dict(dinov2_default_config))
    overrides = {
        "student.arch": "vit_tiny_fmnist",
        "student.patch_size": 7,
        "student.drop_path_rate": 0.0,
        "dino.head_n_prototypes": 256,
        "dino.head_bottleneck_dim": 32,
        "dino.head_hidden_dim": 128,
        "ibot.head_n_prototypes": 256,
        "ibot.head_bottleneck_dim": 32,
        "ibot.head_hidden_dim": 128,
        "crops.global_crops_size": 28,
        "crops.local_crops_size": 14,
        "crops.local_crops_number": 2,
        "optim.epochs": 6,
        "optim.warmup_epochs": 1,
        "optim.freeze_last_layer_epochs": 0,
        "optim.base_lr": 0.004,
        "teacher.warmup_teacher_temp_epochs": 1,
        "train.batch_size_per_gpu": 64,
        "train.OFFICIAL_EPOCH_LENGTH": 50,
        "compute_precision.grad_scaler": False,
    }
    for item in args.set:
        k, v = item.split("=", 1)
        overrides[k] = yaml.safe_load(v)
    for k, v in overrides.items():
        section, key = k.split(".")
        cfg[section][key] = v
    apply_scaling_rules_to_cfg(cfg)  # sqrt_wrt_1024, one process

    model = SSLMetaArch(cfg)
    for k in model.student.keys():
        model.teacher[k].load_state_dict(model.student[k].state_dict())
    model.fsdp_synchronize_streams = lambda: None
    model.train()
    optimizer = build_optimizer(cfg, model.get_params_groups())
    lr_s, wd_s, mom_s, tt_s, llr_s = build_schedulers(cfg)

    img = cfg.crops.global_crops_size
    p = cfg.student.patch_size
    mask_generator = MaskingGenerator(
        input_size=(img // p, img // p), max_num_patches=0.5 * img // p * img // p
    )
    transform = aug.DataAugmentationDINO(
        cfg.crops.global_crops_scale,
        cfg.crops.local_crops_scale,
        cfg.crops.local_crops_number,
        global_crops_size=cfg.crops.global_crops_size,
        local_crops_size=cfg.crops.local_crops_size,
    )
    images = read_idx(args.data, 16).reshape(-1, 28, 28)
    order = np.random.permutation(len(images))
    bs = cfg.train.batch_size_per_gpu

    def batch(it):
        ids = [order[(it * bs + j) % len(order)] for j in range(bs)]
        samples = [(transform(Image.fromarray(images[i], "L").convert("RGB")), ()) for i in ids]
        return collate_data_and_cast(
            samples,
            mask_ratio_tuple=cfg.ibot.mask_ratio_min_max,
            mask_probability=cfg.ibot.mask_sample_probability,
            n_tokens=(img // p) ** 2,
            mask_generator=mask_generator,
            dtype=torch.float32,
        )

    params = {k: [q for q in model.student[k].parameters()] for k in model.student.keys()}
    tparams = {k: [q for q in model.teacher[k].parameters()] for k in model.teacher.keys()}
    fields = ["iteration", "lr", "teacher_temp", "dino_local_crops_loss", "dino_global_crops_loss",
              "koleo_loss", "ibot_loss", "dino_total", "teacher_target_entropy"]
    # The DINO targets' mean entropy: ln(K) means uniform targets (nothing to learn from).
    entropy = []

    def spy(targets_fn):
        def wrapped(*a, **k):
            t = targets_fn(*a, **k)
            entropy.append(float(-(t * t.clamp_min(1e-30).log()).sum(-1).mean()))
            return t

        return wrapped

    for name in ("softmax_center_teacher", "sinkhorn_knopp_teacher"):
        setattr(model.dino_loss, name, spy(getattr(model.dino_loss, name)))
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for it in range(args.iterations):
            data = batch(it)
            lr, wd, mom, tt, llr = lr_s[it], wd_s[it], mom_s[it], tt_s[it], llr_s[it]
            apply_optim_scheduler(optimizer, lr, wd, llr)
            optimizer.zero_grad(set_to_none=True)
            loss_dict = model.forward_backward(data, teacher_temp=tt)
            if cfg.optim.clip_grad:
                for k in params:
                    torch.nn.utils.clip_grad_norm_(params[k], cfg.optim.clip_grad)
            optimizer.step()
            with torch.no_grad():
                for k in params:
                    torch._foreach_mul_(tparams[k], mom)
                    torch._foreach_add_(tparams[k], params[k], alpha=1 - mom)
            row = {k: v.item() for k, v in loss_dict.items()}
            row.update(iteration=it, lr=float(lr), teacher_temp=float(tt),
                       dino_total=row["dino_local_crops_loss"] + row["dino_global_crops_loss"],
                       teacher_target_entropy=entropy[-1])
            w.writerow(row)
            if it % 10 == 0:
                f.flush()
                print(f"it {it}: dino {row['dino_total']:.4f} ibot {row['ibot_loss']:.4f} "
                      f"koleo {row['koleo_loss']:.4f} target entropy {entropy[-1]:.4f}", flush=True)
    torch.save({k: v for k, v in model.teacher.backbone.state_dict().items()},
               os.path.splitext(args.out)[0] + "-teacher-backbone.pt")


if __name__ == "__main__":
    main()
