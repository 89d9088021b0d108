"""Constants shared by training, testing and reports. What they reproduce: docs/reference.md
sections 3-5."""

NUM_CLASSES = 100
IMAGE_SIZE = 32

# CIFAR-100's own statistics (the classic recipe).
CIFAR100_MEAN = (0.5070751592371323, 0.48654887331495095, 0.4409178433670343)
CIFAR100_STD = (0.2673342858792401, 0.2564384629170883, 0.27615047132568404)
# CIFAR-10's statistics, to the digits of the NAM authors' script (the paper recipe), which
# normalizes CIFAR-100 with them by an upstream slip; the paper recipe reproduces it on purpose.
CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)

EPOCHS = 200
MILESTONES = (60, 120, 160)
LR_DECAY = 0.2

DATA_DIR = "./data"
DATASETS = ("cifar100", "cifar10", "folder")  # --dataset: run_data.py
CHECKPOINT_DIR = "checkpoint"
LOG_DIR = "runs"

# The paper's CIFAR-100 table (ResNet rows): (net, attention, #Params in millions, top-1, top-5).
# "ssa" has no public definition, so no model of ours builds it.
PAPER_TABLE = (
    ("resnet50", "none", 23.71, 77.26, 93.63),
    ("resnet50", "cbam", 26.24, 80.56, 95.34),
    ("resnet50", "sa", 23.71, 79.92, 95.00),
    ("resnet50", "eca", 23.71, 79.68, 95.05),
    ("resnet50", "nam", 23.71, 80.62, 95.28),
    ("resnet50", "ca", 25.57, 80.17, 94.94),
    ("resnet50", "ema", 23.85, 80.69, 95.59),
    ("resnet50", "ssa", 25.82, None, None),
    ("resnet101", "none", 42.70, 77.78, 94.39),
    ("resnet101", "ca", 46.22, 80.01, 94.78),
    ("resnet101", "ema", 42.96, 80.86, 95.75),
)
# The rows of that table that can be trained: every one with a public definition (SSA has none).
TRAINED_ROWS = tuple((net, att) for net, att, *_ in PAPER_TABLE if att != "ssa")

# Optimizer, shared by both recipes (docs/reference.md section 3).
BATCH_SIZE = 128
LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4  # on every parameter
NAM_L1 = 1e-4  # NAM's suggested strength for its optional L1 term (off unless --nam-l1 is given)

# The two training recipes. "paper" is the NAM authors' script, which the EMA README names as the
# code behind its CIFAR table; "classic" is the classic CIFAR-100 repo this layout follows.
RECIPES = {
    "paper": dict(mean=CIFAR10_MEAN, std=CIFAR10_STD, rotation=0, warm=0, init="kaiming_uniform"),
    "classic": dict(mean=CIFAR100_MEAN, std=CIFAR100_STD, rotation=15, warm=1, init="pytorch"),
}

# The paper's ImageNet rows for MobileNetV2: (net, attention, #Params in millions, MFLOPs as the
# paper gives them, i.e. multiply-adds, for one 224x224 image).
PAPER_IMAGENET = (
    ("mobilenetv2", "none", 3.50, 300),
    ("mobilenetv2", "ema", 3.55, 306),
)
