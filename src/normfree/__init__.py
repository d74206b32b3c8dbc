"""normfree: deep residual networks without batch normalization, and the
tools to see why they train (signal propagation at initialization)."""
from .agc import AGC, adaptive_clip_grad_, unitwise_norm
from .blocks import ResidualBlock, unfolded
from .convert import convert
from .converted import BranchGain, ConvertedBlock, SkipGain
from .fold import export_model, fold_model
from .data import DATASETS, Batches, Dataset, load_dataset
from .layers import (ACTIVATIONS, PUBLISHED_GAMMAS, RELU_GAMMA, Conv2d, ScalarBias, ScalarGain,
                     ScaledStdConv2d, WeightNormConv2d, activation_gamma, get_activation)
from .lsuv import lsuv_init
from .models import ARCHS, Arch, ResNet, create_model, list_models, make_arch
from .schemes import SCHEMES, Scheme, list_methods, make_scheme
from .signal import (BlockStats, GradStats, SignalStats, effective_depth, find_blocks, measure_gradients,
                     measure_signal, path_length_distribution, predict_variance)
from .study import run_study
from .train import TrainConfig, TrainResult, evaluate, load_model, train

__version__ = "0.1.0"
