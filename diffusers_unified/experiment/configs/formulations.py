"""The five formulations and the two data presets, as functions that edit a config.

Configs are data: each file under configs/<formulation>/ is
`formulation(preset(default))`, so one change here reaches every config that
uses it.
"""


def ddpm(config):
    """DDPM (Ho et al. 2020): 1000 linear betas, eps-MSE, ancestral sampling."""
    config.process.name = "ddpm"
    config.process.num_scales = 1000
    config.training.loss = "ddpm"
    config.training.reduce = "mean"
    config.model.parametrization = "eps"
    config.sampling.method = "ancestral"
    return config


def ncsn(config):
    """NCSN (Song and Ermon 2019): L geometric sigmas, sigma^2-weighted DSM, annealed Langevin.

    The network predicts eps = -sigma * score, i.e. NCSNv2's technique 3 (a
    score network whose output is divided by sigma), which trains far better
    than a raw score output across sigma in [0.01, sigma_max].
    """
    config.process.name = "ncsn"
    config.process.num_scales = 10
    config.process.sigma_min = 0.01
    config.training.loss = "ncsn"
    config.training.reduce = "sum"
    config.model.parametrization = "eps"
    config.sampling.method = "ald"
    config.sampling.step_size = 4e-5  # the NCSN code's step_lr 2e-5 (annealed_langevin)
    config.sampling.n_steps_each = 100
    return config


def vpsde(config):
    """VP SDE (Song et al. 2021): beta 0.1 -> 20, continuous DSM, Euler-Maruyama."""
    config.process.name = "vpsde"
    config.training.loss = "dsm"
    config.model.parametrization = "eps"
    config.sampling.method = "pc"
    config.sampling.predictor = "euler_maruyama"
    config.sampling.corrector = "none"
    return config


def subvpsde(config):
    """sub-VP SDE (Song et al. 2021): as the VP SDE, with the sub-VP diffusion."""
    vpsde(config)
    config.process.name = "subvpsde"
    return config


def vesde(config):
    """VE SDE (Song et al. 2021): continuous DSM, reverse diffusion + Langevin (snr 0.16)."""
    config.process.name = "vesde"
    config.training.loss = "dsm"
    config.model.parametrization = "eps"
    config.sampling.method = "pc"
    config.sampling.predictor = "reverse_diffusion"
    config.sampling.corrector = "langevin"
    config.sampling.snr = 0.16
    config.sampling.n_steps_each = 1
    return config


def ncsnv2_noise_scales(config, levels: bool = True):
    """Noise scales from the training data, by NCSNv2's techniques (Song and Ermon 2020).

    0 means "auto" for these keys: the launcher sets process.sigma_max to the
    largest pairwise distance of the training data (technique 1); if `levels`,
    process.num_scales to the fewest geometric levels down to sigma_min whose
    neighbours overlap (technique 2, for data of 5 or more dimensions); and
    sampling.step_size to annealed Langevin's step for sampling.n_steps_each
    steps per level (technique 4). See diffusers_unified/noise_scales.py.
    """
    config.process.sigma_max = 0  # auto
    if levels:
        config.process.num_scales = 0  # auto
    config.sampling.step_size = 0  # auto
    return config


def toy2d(config):
    """A 2-D toy set and the MLP; sigma_max = 5 is about the data's largest pairwise
    distance (NCSNv2's technique 1) for NCSN, and a safe prior scale for the VE SDE."""
    config.data.dataset = "toy"
    config.data.name = "two_moons"
    config.model.name = "mlp"
    config.process.sigma_max = 5.0
    return config


def digits(config):
    """scikit-learn's 8x8 digits (the `data` extra) and a small U-Net.

    Sized to train on a 2-core CPU in about 45 minutes (2.4 steps/s): nf 32 and
    one residual block per resolution. At 6000 steps its samples are digits,
    as are those of the DDPM-sized U-Net (nf 64, two blocks, lr 2e-4), which
    takes 1.6x longer per step on an H200 and 3-4x longer on the 2-core CPU.
    """
    config.data.dataset = "digits"
    config.data.num_test = 297  # 1500 training images
    config.data.image_size = 8
    config.data.num_channels = 1
    config.data.centered = True
    config.model.name = "unet"
    config.model.nf = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.1
    config.model.ema_rate = 0.999
    config.training.batch_size = 128
    config.training.n_iters = 6_000
    config.training.checkpoint_freq = 1_000
    config.training.snapshot_freq = 2_000
    config.optim.lr = 1e-3
    config.optim.warmup = 200
    config.process.sigma_max = 20.0  # the [-1, 1] digits: largest pairwise distance 9.8
    config.sampling.num_samples = 256
    config.sampling.batch_size = 128  # and the snapshots' size: 1000 ancestral steps, ~2 min
    config.eval.num_samples = 256
    return config


# -- image scale: the papers' CIFAR-10 settings ------------------------------------------------


def cifar10(config, path: str = "data/cifar-10-batches-py"):
    """CIFAR-10 (32x32x3, the python batches) with the score SDE code's recipe.

    Batch 128, Adam at 2e-4 with 5,000 warm-up steps and clipping at 1,
    random horizontal flips, checkpoints and snapshots every 50,000 updates
    (its configs/default_cifar10_configs.py; DDPM uses the same optimiser).
    Data in [0, 1] (data.centered False) as the score SDE code's default;
    the VP configs centre them. Nothing is downloaded: data.path must hold
    the unpacked cifar-10-python.tar.gz (or the archive itself).
    """
    config.data.dataset = "cifar10"
    config.data.path = path
    config.data.image_size = 32
    config.data.num_channels = 3
    config.data.centered = False
    config.data.random_flip = True
    config.training.batch_size = 128
    config.training.n_iters = 1_300_000
    config.training.n_jitted_steps = 5
    config.training.log_freq = 50
    config.training.checkpoint_freq = 10_000
    config.training.snapshot_freq = 50_000
    config.training.keep = 30
    config.optim.optimizer = "adam"
    config.optim.lr = 2e-4
    config.optim.warmup = 5_000
    config.optim.grad_clip = 1.0
    config.model.dropout = 0.1
    config.sampling.num_samples = 50_000
    config.sampling.batch_size = 1_000
    config.eval.num_samples = 50_000
    return config


def ddpmpp(config, deep: bool = False):
    """DDPM++ cont. (Song et al. 2021, VP and sub-VP): the score SDE code's
    configs/vp/cifar10_ddpmpp_continuous.py (deep: num_res_blocks 8, 950,000 updates).

    Noise conditioning on 999 t with DDPM's sinusoidal embedding, BigGAN
    residual blocks, no FIR and no progressive paths; eps prediction (its
    score is -model / sigma), centred data, EMA 0.9999, the DSM loss averaged
    over dimensions (training.reduce_mean = True).
    """
    m = config.model
    m.name = "ncsnpp"
    m.nf, m.ch_mult, m.attn_resolutions = 128, (1, 2, 2, 2), (16,)
    m.num_res_blocks = 8 if deep else 4
    m.resamp_with_conv, m.skip_rescale, m.init_scale = True, True, 0.0
    m.fir, m.fir_kernel, m.resblock_type = False, (1, 3, 3, 1), "biggan"
    m.progressive, m.progressive_input, m.progressive_combine = "none", "none", "sum"
    m.embedding, m.fourier_scale, m.noise_conditional = "sinusoidal", 16.0, True
    m.scale_by_sigma, m.parametrization, m.ema_rate = False, "eps", 0.9999
    config.data.centered = True
    t = config.training
    t.loss, t.weighting, t.reduce = "dsm", "sigma2", "mean"
    if deep:
        config.training.n_iters = 950_000
    return config


def ncsnpp(config, deep: bool = False):
    """NCSN++ cont. (Song et al. 2021, VE): the score SDE code's
    configs/ve/cifar10_ncsnpp_continuous.py (deep: num_res_blocks 8, 950,000 updates).

    Gaussian Fourier features of log sigma, FIR resampling, a residual input
    pyramid, and the output divided by sigma (so the network predicts the
    score and is conditioned on sigma); data in [0, 1], EMA 0.999, the DSM
    loss as half the sum over dimensions (training.reduce_mean = False).
    """
    ddpmpp(config, deep)
    m = config.model
    m.fir, m.progressive_input = True, "residual"
    m.embedding, m.scale_by_sigma, m.parametrization, m.ema_rate = "fourier", True, "score", 0.999
    config.data.centered = False
    config.training.reduce = "sum"
    return config
