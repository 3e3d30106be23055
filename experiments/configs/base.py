"""Defaults shared by every config; the per-table files override a few fields.

Sources for the shared defaults:
* SAM rho=0.05, SGD momentum 0.9, cosine schedule: Foret et al. 2021.
* SAF: tau=5, lag (Ẽ)=3, E_start=5, lambda=0.3; MESA: lambda=0.8 (Du et al.,
  NeurIPS 2022, Sec. 4.1); MESA decay 0.9998 (AngusDujw/SAF MESA_train.py).
* LookSAM: k=5 (Liu et al., CVPR 2022, as quoted by Du et al. 2022), alpha=0.7
  (the value suggested for ViTs; Becker et al. 2024 used 0.1 on CIFAR).
* vSAM: window 50, 5 blocks, max rate 0.8 (at most 40 SAM steps a window),
  sensitivities 0.13, reuse decay 0.7 (ajiaaa/vSAM train_vsam.py defaults; its
  first 3 epochs are all SAM steps, see ``vsam.warmup_epochs`` in the CIFAR
  configs).
"""

import ml_collections

from experiments import training


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "run"
    c.dataset = "cifar10"
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.model = "resnet18"
    c.model_kwargs = ml_collections.ConfigDict()
    c.method = "sgd"
    c.seed = 0
    c.num_epochs = 200
    c.batch_size = 128
    c.eval_batch_size = 256
    c.max_steps_per_epoch = 0  # 0: a full pass over the training set
    c.augment = True
    c.in_memory = True  # decode the split once (CIFAR/MNIST); ImageNet configs turn it off
    c.data_threads = 0  # grain threads building batches (0: in the training thread)

    c.optimizer = "sgd"
    c.learning_rate = 0.1
    c.lr_schedule = "cosine"
    c.warmup_epochs = 0
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 5e-4
    c.grad_clip = 1.0  # adamw only
    c.label_smoothing = 0.0

    # LookSAM / vSAM: 'host' dispatches between two compiled steps from
    # sharpax.upcoming_sam_steps(opt_state); 'cond' decides on device with lax.cond.
    c.dispatch = "host"

    c.sam = ml_collections.ConfigDict(dict(rho=0.05, eta=0.01))
    c.looksam = ml_collections.ConfigDict(dict(k=5, alpha=0.7))
    c.vsam = ml_collections.ConfigDict(
        dict(
            window=50,
            blocks=5,
            max_rate=0.8,
            sensitivity=(0.13, 0.13),
            reuse_decay=0.7,
            max_reuse=6,
            warmup_epochs=0,  # all SAM steps for this many epochs (steps derived at setup)
        )
    )
    c.saf = ml_collections.ConfigDict(
        dict(lag=3, start_epoch=5, temperature=5.0, weight=0.3, dtype="float32", shard_buffer=False)
    )
    c.mesa = ml_collections.ConfigDict(
        dict(decay=0.9998, start_epoch=5, temperature=5.0, weight=0.8)
    )
    return c


def parse_arg(arg: str | None) -> tuple[str, bool]:
    """'saf' -> ('saf', False); 'saf,runlocal' -> ('saf', True); None -> ('sgd', False)."""
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    runlocal = "runlocal" in parts
    methods = [p for p in parts if p != "runlocal"]
    method = methods[0] if methods else "sgd"
    if method not in training.METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {training.METHODS}")
    return method, runlocal


def finalize(c: ml_collections.ConfigDict, method: str, runlocal: bool) -> ml_collections.ConfigDict:
    """Sets the method and, for ``runlocal``, shrinks the run to a smoke test."""
    c.method = method
    c.name = f"{c.dataset}_{c.model}_{method}"
    if runlocal:
        c.num_epochs = 1
        c.batch_size = 16
        c.eval_batch_size = 16
        c.max_steps_per_epoch = 2
    return c


def cifar_config(dataset: str, model: str, arg: str | None) -> ml_collections.ConfigDict:
    """A row of SAF Table 3 (CIFAR-10/100 x ResNet-18 / WRN-28-10 / PyramidNet-110).

    Batch 128, 200 epochs, SGD(momentum 0.9), lr 0.1 cosine, weight decay 5e-4,
    SAM rho 0.05, pad-4 crop + flip: the common SAM CIFAR recipe (Foret et al.
    2021; the SAF paper defers its CIFAR recipe to an appendix we could not read,
    so this is our choice, not a transcription). SAF tau=5, lag 3, E_start 5,
    lambda 0.3; MESA lambda 0.8 (Du et al. 2022, Sec. 4.1, "for all the
    experiments"); MESA decay 0.9998 (AngusDujw/SAF MESA_train.py default);
    vSAM: the first 3 epochs are all SAM steps (ajiaaa/vSAM train_vsam.py).
    """
    method, runlocal = parse_arg(arg)
    c = get_base_config()
    c.dataset = dataset
    c.model = model
    if model.startswith("resnet"):
        c.model_kwargs.stem = "cifar"
    c.vsam.warmup_epochs = 3
    return finalize(c, method, runlocal)


def imagenet_resnet_config(model: str, arg: str | None) -> ml_collections.ConfigDict:
    """A ResNet row of SAF Table 1 (ImageNet-1k).

    Batch 4096, lr 1.4, 90 epochs, SGD momentum 0.9 (Du et al. 2022, Sec. 4.1);
    cosine schedule, 3 warm-up epochs, label smoothing 0.1 (AngusDujw/SAF
    SAF_train.py defaults); weight decay 1e-4 (AngusDujw/SAF run.sh). SAF buffer
    in bfloat16 and sharded over the devices: 1.28M x 4 x 1000 x 2 B = 10 GB in
    total instead of 20 GB per replica.
    """
    method, runlocal = parse_arg(arg)
    c = get_base_config()
    c.dataset = "imagenet2012"
    c.model = model
    c.num_epochs = 90
    c.batch_size = 4096
    c.eval_batch_size = 1024
    c.learning_rate = 1.4
    c.warmup_epochs = 3
    c.weight_decay = 1e-4
    c.label_smoothing = 0.1
    c.in_memory = False
    c.data_threads = 16
    c.saf.dtype = "bfloat16"
    c.saf.shard_buffer = True
    return finalize(c, method, runlocal)
