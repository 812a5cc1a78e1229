"""The default configuration: every key the launcher reads, and nothing else.

Every other config derives from this one by calling `get_config()` and
changing values; the launcher rejects keys that are not here. Values here
train a VP SDE on the two-moons toy set with a small MLP.
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 42  # the run's PRNG seed: parameters, data order and every update's key

    # -- data ------------------------------------------------------------------
    config.data = data = ml_collections.ConfigDict()
    # (none: no data, only the image shape, for sampling a model trained elsewhere)
    # toy | gmm | digits | npz | image_folder | cifar10 | cifar100 | tfds | hf | none
    data.dataset = "toy"
    data.name = (
        "two_moons"  # toy set: swiss_roll | two_moons | eight_gaussians | checkerboard | rings
    )
    # npz: the .npz file (keys x, y); image_folder: the folder; cifar10 | cifar100: the
    # unpacked cifar-10-batches-py/ or cifar-100-python/, its parent, or the .tar.gz;
    # tfds: its data_dir and hf: its cache_dir ("" = the library's default).
    data.path = ""
    data.num_train = 20_000  # toy | gmm: examples drawn for training
    # Held-out examples (toy | gmm: drawn; npz | image_folder, and tfds | hf with
    # data.split_test = "": split off at random). cifar10 | cifar100 use the official test set.
    data.num_test = 4_000
    data.image_size = 8  # images: height = width after loading (folders, tfds, hf: resized)
    data.num_channels = 1  # images: 1 (grayscale) or 3 (RGB)
    # image_folder | tfds | hf: a centred crop_size square cut first, then the largest centred
    # square resized to image_size (the score SDE code's CelebA: 140, then 64); 0 = no fixed crop.
    data.crop_size = 0
    # image_folder | tfds | hf: pillow's antialiased resize filter: bicubic (the score SDE
    # code's crop_resize) | bilinear (its CelebA resize_small) | lanczos | box | nearest.
    data.resample = "bicubic"
    # image_folder: a seeded random subset of this many files; cifar10 | cifar100 | tfds | hf:
    # the first this many examples of each split. 0 = all (quick runs on a big set).
    data.max_examples = 0
    data.tfds_name = ""  # tfds: the TFDS name, prepared under data.path (cifar10, celeb_a, ...)
    data.hf_name = ""  # hf: a save_to_disk directory, or a hub name read from the local cache
    data.split_train = "train"  # tfds | hf: the training split (or a TFDS slice, "train[:10%]")
    # tfds | hf: the held-out split (celeb_a: "validation"); "" = split data.num_test off the
    # training split at random.
    data.split_test = "test"
    data.image_key = "image"  # tfds | hf: the image feature (Hugging Face's cifar10: "img")
    data.label_key = "label"  # tfds | hf: the label feature; "" = unlabelled
    data.centered = True  # images scaled to [-1, 1] if true, else [0, 1]
    data.uniform_dequantization = False  # add U(0, 1) / 2^bits noise to quantised data
    data.random_flip = False  # images: mirror each training image left-right with p = 1/2
    data.validate_batches = 10  # check this many first batches (shape, range, finite); 0 = all

    # -- process -----------------------------------------------------------------
    config.process = process = ml_collections.ConfigDict()
    process.name = "vpsde"  # vpsde | subvpsde | vesde | ddpm | ncsn
    process.beta_min = 0.1  # vpsde, subvpsde
    process.beta_max = 20.0  # vpsde, subvpsde
    process.sigma_min = 0.01  # vesde, ncsn
    process.sigma_max = 50.0  # vesde, ncsn
    process.num_scales = 1000  # N: noise levels (ddpm, ncsn), default sampler steps (SDEs)
    process.schedule = "linear"  # ddpm: linear | cosine
    process.beta_start = 1e-4  # ddpm, linear schedule
    process.beta_end = 0.02  # ddpm, linear schedule
    # What the network is conditioned on: auto (999 t, or sigma for the networks that divide
    # by it) | time (999 t) | sigma | index (ddpm, ncsn: the level index, as diffusers' models)
    process.conditioning = "auto"

    # -- model -------------------------------------------------------------------
    config.model = model = ml_collections.ConfigDict()
    model.name = "mlp"  # mlp (vector data) | unet | ncsnpp | refinenet (images)
    model.parametrization = "eps"  # what the network predicts: eps | x0 | score | v
    model.ema_rate = 0.999  # EMA of the parameters, used for sampling and evaluation
    # Activations of the image networks in float32 | bfloat16 | float16; parameters,
    # optimiser state, the loss and the sampler's state stay float32.
    model.dtype = "float32"
    model.embedding = "sinusoidal"  # noise-level embedding: sinusoidal | fourier
    model.fourier_scale = 16.0  # embedding=fourier: scale of the Gaussian Fourier features
    model.emb_dim = 128  # mlp: width of the noise-level embedding
    model.hidden = (256, 256, 256)  # mlp: hidden layer widths
    model.nf = 64  # unet, ncsnpp, refinenet: base channel count (refinenet's ngf)
    model.ch_mult = (1, 2)  # unet, ncsnpp: channel multiplier per resolution
    model.num_res_blocks = 2  # unet, ncsnpp: residual blocks per resolution
    model.attn_resolutions = (4,)  # unet, ncsnpp: resolutions with self-attention
    model.dropout = 0.1  # unet, ncsnpp: dropout rate in residual blocks
    model.resamp_with_conv = True  # unet, ncsnpp: convolutions in up/downsampling
    model.skip_rescale = False  # unet, ncsnpp: scale skip sums by 1/sqrt(2) (DDPM++ / NCSN++)
    # unet: self-attention on the way up once per level (the score SDE code's ddpm.py) or
    # after every block (Ho et al.'s code and diffusers' UNet2DModel): per_level | per_block
    model.up_attention = "per_level"
    model.num_groups = 32  # unet: GroupNorm groups (fewer in narrow layers: >= 4 channels each)
    model.norm_eps = 1e-6  # unet: GroupNorm epsilon (DDPM's)
    # NCSN++ / DDPM++ (Song et al. 2021, the score SDE code's models/ncsnpp.py):
    model.resblock_type = "biggan"  # ncsnpp: ddpm | biggan
    model.fir = True  # ncsnpp: FIR (anti-aliased) up/downsampling
    model.fir_kernel = (1, 3, 3, 1)  # ncsnpp: the FIR kernel
    model.progressive = "none"  # ncsnpp, output side: none | output_skip | residual
    model.progressive_input = "residual"  # ncsnpp, input side: none | input_skip | residual
    model.progressive_combine = "sum"  # ncsnpp: how input skips join a level: sum | cat
    model.init_scale = 0.0  # ncsnpp: scale of the last conv of each block (0: 1e-10)
    model.noise_conditional = True  # ncsnpp: embed the noise level (False: no embedding)
    # ncsnpp, refinenet: divide the output by sigma (the score SDE code's VE score networks;
    # the network is then conditioned on sigma itself, and predicts the score).
    model.scale_by_sigma = False
    model.refinenet = "ncsnv2"  # refinenet depth: ncsnv2 | ncsnv2_deeper | ncsnv2_deepest
    # refinenet: the score SDE code's JAX port of NCSNv2 (what its checkpoints need) instead
    # of the PyTorch NCSNv2 code's network (nets.refinenet_kwargs says how they differ)
    model.score_sde_port = False
    # Condition on labels (the dataset must have them; their number is the dataset's
    # num_classes, and label num_classes is the null label of classifier-free guidance).
    model.class_conditional = False

    # -- training ------------------------------------------------------------------
    config.training = training = ml_collections.ConfigDict()
    # score: the score network | classifier: a noise-conditional classifier p_t(y | x) for
    # classifier-guided sampling (the score SDE paper's sec. 5; model.name mlp or unet picks
    # an MLP or a ResNet classifier; its loss is the cross-entropy on noisy data)
    training.task = "score"
    training.loss = "dsm"  # ddpm | ncsn | dsm | ssm
    training.weighting = "sigma2"  # dsm: sigma2 | likelihood
    # dsm with weighting=likelihood: draw t with density g^2 / sigma^2 and reweight (Song et
    # al. 2021, maximum likelihood training), a lower-variance estimator of the same loss
    training.importance_sampling = False
    # squared error over dimensions: mean | sum (half the sum, the score SDE code's)
    training.reduce = "mean"
    training.t_min = 1e-5  # dsm, ssm, classifier: training times t ~ U(t_min, T)
    # Classifier-free guidance: probability that a label is replaced by the null
    # label, so the network also learns the unconditional score (Ho and Salimans
    # use 0.1 or 0.2). Needs model.class_conditional; 0 = always the true label.
    training.label_dropout = 0.0
    training.batch_size = 512  # global batch, split over every device
    training.n_jitted_steps = 5  # updates per compiled call (a lax.scan): less dispatch overhead
    training.n_iters = 6_000  # total updates
    training.log_freq = 100  # metrics line every log_freq updates
    training.checkpoint_freq = 1_000  # checkpoint every checkpoint_freq updates (and at the end)
    training.snapshot_freq = 0  # sample figure every snapshot_freq updates and at the end; 0: none
    training.keep = 3  # committed checkpoints kept (the newest, by step number)
    # Held-out loss (the training loss of the EMA parameters on a test batch, as the score
    # SDE code's eval_loss) after the chunk of updates that reaches a multiple of this; 0: none.
    training.eval_freq = 100

    # -- optimiser -------------------------------------------------------------------
    config.optim = optim = ml_collections.ConfigDict()
    optim.optimizer = "adam"  # adam | adamw
    optim.lr = 1e-3
    optim.beta1 = 0.9
    optim.beta2 = 0.999
    optim.eps = 1e-8
    optim.weight_decay = 0.0  # adamw only
    optim.warmup = 100  # linear learning-rate warmup steps (0 = none)
    optim.grad_clip = 1.0  # global-norm clipping (<= 0 = none)
    optim.skip_nonfinite = 0  # > 0: skip non-finite updates, stop after this many in a row

    # -- sampling --------------------------------------------------------------------
    config.sampling = sampling = ml_collections.ConfigDict()
    # ancestral | ddim | ald | pc | ode | dpm_solver | edm_heun | edm_stochastic
    sampling.method = "pc"
    # pc: none | euler_maruyama | reverse_diffusion | ancestral | ddim
    sampling.predictor = "euler_maruyama"
    sampling.corrector = "none"  # pc: none | langevin | ald
    sampling.snr = 0.16  # pc: corrector signal-to-noise ratio
    sampling.n_steps_each = 1  # pc: corrector steps per level; ald: steps per level (T)
    # Grid points; 0 = the sampler's default: the process's N, or 20 (dpm_solver) and 18
    # levels (edm_heun, 35 NFE), their papers' settings.
    sampling.num_steps = 0
    sampling.denoise = True  # final Tweedie denoising step
    sampling.eta = 0.0  # ddim: 0 deterministic ... 1 ancestral
    # ancestral: reference (each process's reference code: large for DDPM, VP, sub-VP;
    # small for VE, NCSN) | small (beta-tilde) | large (beta)
    sampling.variance = "reference"
    sampling.clip_x0 = False  # ancestral, ddim: clip the predicted x_0 to [-1, 1] (DDPM's code)
    # ald: the NCSN paper's epsilon; 4e-5 is the NCSN code's step_lr 2e-5 (epsilon = 2 step_lr)
    sampling.step_size = 4e-5
    sampling.ode_method = "dopri5"  # ode: euler | heun | rk4 | dopri5 | tsit5
    sampling.rtol = 1e-5  # ode, adaptive methods
    sampling.atol = 1e-5  # ode, adaptive methods
    # edm_heun: the ODE Heun integrates. none = EDM's (y = x / alpha in sigma); vp = the
    # variance-preserving scaling in log sigma, 19 NFE where none needs 29-39 on the
    # example mixtures (samplers.edm_heun).
    sampling.edm_scaling = "none"
    # edm_stochastic (EDM's Alg. 2; num_steps 0 = 256 levels): its churn settings, the EDM
    # code's ImageNet-64 ones by default
    sampling.edm_s_churn = 40.0
    sampling.edm_s_tmin = 0.05
    sampling.edm_s_tmax = 50.0
    sampling.edm_s_noise = 1.003
    # Classifier-free guidance weight w (Ho and Salimans): score (1 + w) s(x, y) - w s(x, null).
    # 0 = plain conditional sampling; > 0 needs training.label_dropout > 0. diffusers'
    # guidance_scale is 1 + w.
    sampling.guidance_weight = 0.0
    sampling.class_label = -1  # class-conditional: every sample's label; -1 = classes in turn
    # Classifier guidance (the score SDE paper): the work directory of a classifier trained
    # with training.task=classifier on the same data and process; samples of class
    # sampling.class_label (or classes in turn) from score + scale * grad log p_t(y | x).
    sampling.classifier_workdir = ""
    sampling.classifier_scale = 1.0
    sampling.num_samples = 2_000  # samples written by --mode=sample and the final snapshot
    sampling.batch_size = 2_000  # samples drawn per sampler call (per device)
    sampling.write_png = False  # images: also write every sample as a PNG file

    # -- evaluation --------------------------------------------------------------------
    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.num_samples = 2_000  # samples compared with held-out data by --mode=eval
    # Likelihood of held-out data: ode (probability-flow ODE, any process) | bound
    # (DDPM's variational bound; ddpm only) | all (every one the process has) | none.
    evaluate.likelihood = "ode"
    evaluate.num_likelihood = 1_000  # held-out examples whose likelihood is computed
    evaluate.likelihood_batch = 500  # examples per compiled likelihood call (and resumable unit)
    evaluate.divergence = "hutchinson"  # ode: exact (Jacobian trace; small dims) | hutchinson
    evaluate.probe = "rademacher"  # hutchinson probes: rademacher | gaussian
    evaluate.num_probes = 1  # hutchinson probes per example
    evaluate.ode_method = "dopri5"  # ode: dopri5 | tsit5 (adaptive) | euler | heun | rk4
    evaluate.rtol = 1e-5  # ode, adaptive methods (the score SDE code's RK45 setting)
    evaluate.atol = 1e-5
    evaluate.num_steps = 1_000  # ode, fixed-step methods
    evaluate.t_min = 1e-5  # ode: the likelihood's start time (the score SDE code's eps)
    # FID, Inception Score and KID on the FID Inception-v3 (images): the weights are a local
    # file written once by `diffusers-unified-convert inception` (nothing is downloaded).
    evaluate.fid = False
    evaluate.inception_weights = ""
    evaluate.fid_split = "train"  # the data split the samples are compared with: train | test
    evaluate.fid_stats = ""  # optional precomputed reference statistics (pytorch-fid .npz)
    evaluate.inception_batch = 200  # images per Inception call (per device)
    evaluate.kid_reference = 10_000  # reference images whose features KID uses
    evaluate.is_splits = 10  # Inception Score splits (improved-GAN; TF-GAN's is 1)

    # -- logging (metrics.jsonl is always written) --------------------------------------
    config.logging = logging = ml_collections.ConfigDict()
    # TensorBoard event files under <workdir>/tensorboard/ (needs tensorboardX, the
    # `tensorboard` extra; without it, a note and metrics.jsonl only).
    logging.tensorboard = True
    logging.wandb = False  # Weights & Biases (needs wandb; WANDB_MODE=offline keeps it local)
    logging.wandb_project = "diffusers_unified"
    logging.wandb_entity = ""  # "" = wandb's default entity

    # -- several hosts ------------------------------------------------------------------
    config.distributed = distributed = ml_collections.ConfigDict()
    distributed.enabled = False  # join other processes through jax.distributed.initialize
    distributed.coordinator_address = ""  # host:port of process 0
    distributed.num_processes = 1
    distributed.process_id = 0
    distributed.cpu_collectives = "gloo"  # CPU cross-process collectives implementation

    return config
