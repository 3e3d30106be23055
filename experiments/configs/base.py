"""Defaults shared by every config, the paper recipes, and the rule that scales them to short runs.

Where each value comes from is in ``docs/configs.md`` (one table: hyperparameter,
value, source). In short:

* :func:`get_base_config`: the methods' own defaults, as the papers and the
  authors' code give them for a 200-epoch CIFAR run.
* :func:`cifar_config`: a row of SAF Table 3 (CIFAR-10/100).
* :func:`vsam_cifar_config`: the vSAM authors' CIFAR recipe (``train_vsam.py``).
* :func:`imagenet_resnet_config`: a ResNet row of SAF Table 1 (ImageNet-1k).
* :func:`scale_to_run`: the one rule that maps the methods' time constants
  (given for a 200-epoch run) to a shorter run, used by the MNIST-1D and MNIST
  configs.

SAF/MESA start epoch: ``sharpax.saf(start_epoch=s)`` is on for 0-based epochs
``e >= s``. The paper (Du et al. 2022, Algorithm 1) has ``e > E_start`` with
epochs from 1 and ``E_start = 5``: on from the 6th epoch, 0-based 5, so
``start_epoch = 5`` (used here: the paper's recipe comes first). The authors'
scripts (AngusDujw/SAF ``SAF_train.py`` / ``MESA_train.py``) test
``epoch > kl_start_epoch`` on 0-based epochs: on from 0-based epoch 6, so they
map to ``start_epoch = kl_start_epoch + 1`` (:func:`official_kl_start`), one
epoch later than the paper. Their ``epoch < kl_end_epoch`` maps to
``end_epoch = kl_end_epoch`` (defaults 300 / 360, never reached in their
100-epoch runs: ``end_epoch = None`` here).
"""

from __future__ import annotations

import math

import ml_collections

from experiments.methods import METHODS

# The run the methods' time constants are given for: SAF/MESA/vSAM on CIFAR, 200 epochs.
PAPER_EPOCHS = 200


def official_kl_start(kl_start_epoch: int) -> int:
    """``sharpax.saf``/``mesa`` ``start_epoch`` for the authors' ``--kl_start_epoch``.

    Their test is ``epoch > kl_start_epoch`` on 0-based epochs; sharpax's is
    ``epoch >= start_epoch``.
    """
    return kl_start_epoch + 1


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "run"
    c.dataset = "cifar10"
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.model = "resnet18"
    c.model_kwargs = ml_collections.ConfigDict()
    c.method = "sgd"
    c.seed = 0
    c.num_epochs = PAPER_EPOCHS
    c.batch_size = 128
    c.eval_batch_size = 256
    c.max_steps_per_epoch = 0  # 0: a full pass over the training set
    c.augment = True
    c.cutout = 0  # side of the cutout square (0: none)
    c.cutout_prob = 1.0
    # Symmetric label noise on the training set (input_pipeline.symmetric_label_noise);
    # the flip set depends on label_noise_seed only, never on the training seed.
    c.label_noise = 0.0
    c.label_noise_seed = 0
    c.in_memory = True  # decode the split once (CIFAR/MNIST); ImageNet configs turn it off
    c.data_threads = 0  # grain threads building batches (0: in the training thread)
    # Checkpoint also every N global steps (0: only at the end of each epoch; SIGTERM always).
    c.checkpoint_every_steps = 0

    c.optimizer = "sgd"
    c.learning_rate = 0.1
    c.lr_schedule = "cosine"
    c.warmup_epochs = 0
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 5e-4
    # False: no decay on 1-D tensors, biases and norm scales (timm's filter_bias_and_bn).
    c.weight_decay_on_1d = True
    c.grad_clip = 1.0  # adamw only
    c.label_smoothing = 0.0
    # An EMA of the model, evaluated beside it (test_accuracy_ema in metrics.jsonl);
    # horizon in epochs, 0: off. MESA's teacher is such an EMA and is always evaluated.
    c.model_ema_horizon_epochs = 0.0

    # Mixed precision (experiments/precision.py): the models' compute dtype and the params'
    # stored dtype ('float32', 'bfloat16', 'float16'); loss_scale 'auto' is dynamic loss
    # scaling iff float16 is involved (skipped non-finite steps are counted, not divergence).
    c.precision = ml_collections.ConfigDict(
        dict(
            compute_dtype="float32",
            param_dtype="float32",
            loss_scale="auto",
            loss_scale_init=2.0**15,
            loss_scale_period=2000,
            loss_scale_factor=2.0,
        )
    )

    # LookSAM / vSAM: 'host' dispatches between two compiled steps from
    # sharpax.upcoming_sam_steps(opt_state); 'cond' decides on device with lax.cond.
    c.dispatch = "host"

    c.sam = ml_collections.ConfigDict(dict(rho=0.05))
    # ASAM (Kwon et al. 2021): its own radius; scale='weights' applies T = |w| + eta only to
    # kernels / norm scales / embeddings as the authors' code does, 'all' to every leaf.
    c.asam = ml_collections.ConfigDict(dict(rho=0.5, eta=0.0, scale="weights"))
    c.looksam = ml_collections.ConfigDict(dict(k=5, alpha=0.7))
    c.vsam = ml_collections.ConfigDict(
        dict(
            window=50,
            blocks=5,
            max_rate=0.8,
            sensitivity=(0.13, 0.13),
            reuse_decay=0.7,
            max_reuse=6,
            warmup_epochs=3,  # all SAM steps for this many epochs (steps derived at setup)
            stat_last_tensors=0,  # statistics on the last N tensors in layer order (0: all)
        )
    )
    # AE-SAM (Jiang et al., ICLR 2023): EMA decay and the threshold multiplier's linear
    # schedule (lambda_2 -> lambda_1) as we read the paper's Algorithm 1 (no authors' code).
    # lookahead_alpha: None for AE-SAM, 0.7 (LookSAM's alpha) for AE-LookSAM. lagged: decide
    # from the previous step's norm so the host can dispatch (not the paper's rule).
    c.ae_sam = ml_collections.ConfigDict(
        dict(
            decay=0.9,
            threshold_start=1.0,
            threshold_end=-1.0,
            lookahead_alpha=ml_collections.FieldReference(None, field_type=float),
            lagged=False,
        )
    )
    # SS-SAM / RST (Zhao et al. 2022): SAM-step probability ramp over the run; a constant
    # 0.5 costs what the paper compares against (1.5 passes per step on average).
    c.ss_sam = ml_collections.ConfigDict(dict(p_start=0.5, p_end=0.5, shape="constant"))
    # GSAM (Zhuang et al., ICLR 2022): rho linear in the learning rate from rho_min to rho_max
    # (sharpax.gsam_rho_schedule). Small-task default (our choice): SAM's constant radius and the
    # alpha of the authors' PyTorch CIFAR example (0.4); ImageNet configs use the paper's Table 4.
    c.gsam = ml_collections.ConfigDict(dict(rho_max=0.05, rho_min=0.05, alpha=0.4, adaptive=False))
    # ESAM (Du et al., ICLR 2022): dydjw9/Efficient_SAM run.sh for ResNet-18 (beta 0.6, gamma 0.5);
    # rho is sam.rho (0.05, also theirs).
    c.esam = ml_collections.ConfigDict(dict(beta=0.6, gamma=0.5))
    # MSAM (Becker et al. 2024): rho = 3 in every MSAM command of the authors' README.
    c.msam = ml_collections.ConfigDict(dict(rho=3.0))
    c.saf = ml_collections.ConfigDict(
        dict(
            lag=3,
            start_epoch=5,
            end_epoch=ml_collections.FieldReference(None, field_type=int),
            temperature=5.0,
            weight=0.3,
            dtype="float32",
            shard_buffer=False,
        )
    )
    c.mesa = ml_collections.ConfigDict(
        dict(
            ema_horizon_epochs=4.0,  # decay = 1 - 1 / (horizon * steps_per_epoch)
            start_epoch=5,
            end_epoch=ml_collections.FieldReference(None, field_type=int),
            temperature=5.0,
            weight=0.8,
        )
    )
    return c


def scale_to_run(c: ml_collections.ConfigDict, paper_epochs: int = PAPER_EPOCHS):
    """Maps the methods' time constants from a ``paper_epochs`` run to ``c.num_epochs``.

    The rule: each quantity keeps its fraction of training. With
    ``f = c.num_epochs / paper_epochs``, the epoch counts (SAF/MESA start epoch,
    SAF's lag, vSAM's warm-up) become ``ceil(f · value)`` (at least 1: a term
    that starts, a lag, a warm-up stay real) and MESA's EMA horizon (a real
    number of epochs) becomes ``f · horizon``. vSAM's window of 50 steps would
    become ``f · 50 · (paper steps / run steps)``, below one step for any short
    run; but the window is also the sample from which vSAM's 5 blocks estimate a
    variance, so it is floored at 4 samples per block (``4 · blocks``): the one
    exception, for that reason.

    Returns ``c`` (modified in place), with ``c.scaled_from_epochs`` recording
    the reference length.
    """
    f = c.num_epochs / paper_epochs
    for section, field in (("saf", "start_epoch"), ("saf", "lag"), ("mesa", "start_epoch")):
        c[section][field] = max(1, math.ceil(f * c[section][field]))
    c.vsam.warmup_epochs = max(1, math.ceil(f * c.vsam.warmup_epochs))
    c.mesa.ema_horizon_epochs = f * c.mesa.ema_horizon_epochs
    c.vsam.window = 4 * c.vsam.blocks
    c.scaled_from_epochs = paper_epochs
    return c


def parse_arg(arg: str | None) -> tuple[str, bool]:
    """'saf' -> ('saf', False); 'saf,runlocal' -> ('saf', True); None -> ('sgd', False)."""
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    runlocal = "runlocal" in parts
    methods = [p for p in parts if p != "runlocal"]
    method = methods[0] if methods else "sgd"
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {tuple(METHODS)}")
    return method, runlocal


def finalize(c: ml_collections.ConfigDict, method: str, runlocal: bool) -> ml_collections.ConfigDict:
    """Sets the method and, for ``runlocal``, shrinks the run to a smoke test.

    MSAM is heavy-ball SGD (its momentum is the ascent direction; the authors' runs use no
    Nesterov), so ``nesterov`` is turned off for it.
    """
    c.method = method
    if method == "msam":
        c.nesterov = False
    c.name = f"{c.dataset}_{c.model}_{method}"
    if runlocal:
        c.num_epochs = 1
        c.batch_size = 16
        c.eval_batch_size = 16
        c.max_steps_per_epoch = 2
        # EMA horizons of at least one epoch (2 steps): shorter ones would be under a step.
        c.mesa.ema_horizon_epochs = max(c.mesa.ema_horizon_epochs, 1.0)
        if c.model_ema_horizon_epochs:
            c.model_ema_horizon_epochs = max(c.model_ema_horizon_epochs, 1.0)
    return c


# ASAM's radius per dataset (Kwon et al. 2021, SamsungLabs/ASAM README commands).
ASAM_RHO = {"cifar10": 0.5, "cifar100": 1.0}


def _cifar_common(dataset: str, model: str) -> ml_collections.ConfigDict:
    """What every CIFAR recipe shares: the CIFAR stem, ASAM's radius, vSAM's last 10 tensors."""
    c = get_base_config()
    c.dataset = dataset
    c.model = model
    if model.startswith("resnet"):
        c.model_kwargs.stem = "cifar"
    c.asam.rho = ASAM_RHO[dataset]
    c.vsam.stat_last_tensors = 10
    return c


def cifar_config(dataset: str, model: str, arg: str | None) -> ml_collections.ConfigDict:
    """A row of SAF Table 3 (CIFAR-10/100 x ResNet-18 / WRN-28-10 / PyramidNet-110).

    Batch 128, 200 epochs, SGD momentum 0.9, lr 0.1 cosine, weight decay 5e-4,
    pad-4 crop + flip, no label smoothing, SAM rho 0.05 (source per value in
    ``docs/configs.md``; the SAF paper gives its CIFAR recipe in an appendix we
    could not read, so these are our choice, the common SAM CIFAR recipe). SAF:
    tau 5, lambda 0.3, lag 3, KL from 0-based epoch 5 (paper, Sec. 4.1);
    MESA: lambda 0.8, EMA horizon 4 epochs (the authors' 0.9998 at 1251 steps per
    epoch); ASAM rho 0.5 (CIFAR-10) / 1.0 (CIFAR-100), eta 0, weights only;
    vSAM: its authors' defaults (first 3 epochs all SAM steps, statistics on the
    last 10 tensors).
    """
    c = _cifar_common(dataset, model)
    return finalize(c, *parse_arg(arg))


def vsam_cifar_config(dataset: str, model: str, arg: str | None) -> ml_collections.ConfigDict:
    """The vSAM authors' CIFAR recipe (ajiaaa/vSAM ``train_vsam.py``), for vSAM's tables.

    Batch 128, 200 epochs, SGD momentum 0.9 (no Nesterov), lr 0.05 with a
    per-step cosine to 0, weight decay 1e-3 on every parameter, label smoothing
    0.1, pad-4 crop + flip + cutout 16 with probability 0.5, rho 0.05; vSAM
    window 50 in 5 blocks, rates (0.13, 0.13), max rate 0.8, reuse decay 0.7,
    the first 3 epochs all SAM steps, statistics on the last 10 parameter
    tensors (``--last_layer 10``) in layer order.

    Deviation: the authors' smoothed cross-entropy spreads 0.1 over the C − 1
    wrong classes; ``optax.smooth_labels`` spreads it over all C classes (the
    true class's target is 0.9 + 0.1/C instead of 0.9).
    """
    c = _cifar_common(dataset, model)
    c.learning_rate = 0.05
    c.weight_decay = 1e-3
    c.label_smoothing = 0.1
    c.cutout = 16
    c.cutout_prob = 0.5
    return finalize(c, *parse_arg(arg))


def imagenet_resnet_config(model: str, arg: str | None) -> ml_collections.ConfigDict:
    """A ResNet row of SAF Table 1 (ImageNet-1k).

    From the paper (Du et al. 2022, Sec. 4.1): batch 4096, lr 1.4, 90 epochs, SGD
    momentum 0.9. From the authors' scripts (AngusDujw/SAF ``run.sh`` and timm's
    defaults they run with): Nesterov, weight decay 1e-4 not on biases and
    BatchNorm (timm's ``filter_bias_and_bn``), 3 linear warm-up epochs, cosine
    schedule, label smoothing 0.1, a model EMA evaluated beside the model (their
    reported accuracy is the EMA's) with decay 0.9998 at 1251 steps per epoch: a
    horizon of 4 epochs, kept in epochs at batch 4096. SAF's lag: 3 (the
    paper; ``run.sh`` passes 2). Deviation: the scripts' 10 cool-down epochs at
    lr 1e-6 after the 90 are not run. The SAF buffer is bfloat16 and sharded over
    the devices: 1.28M x 4 x 1000 x 2 B = 10 GB in total instead of 20 GB per
    replica.
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
    c.nesterov = True
    c.weight_decay = 1e-4
    c.weight_decay_on_1d = False
    c.label_smoothing = 0.1
    c.model_ema_horizon_epochs = 4.0
    c.in_memory = False
    c.data_threads = 16
    c.saf.dtype = "bfloat16"
    c.saf.shard_buffer = True
    c.vsam.warmup_epochs = 0
    # GSAM paper Table 4 (ResNet-50/101; ResNet-152 uses alpha 0.005).
    c.gsam.update(dict(rho_max=0.04, rho_min=0.02, alpha=0.005 if model == "resnet152" else 0.01))
    return finalize(c, method, runlocal)
