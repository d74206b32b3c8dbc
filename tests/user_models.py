"""Models and data as a user's own package would hold them, importable as
``user_models:NAME`` specs (pytest puts tests/ on sys.path; the CLI tests in a
subprocess add it to PYTHONPATH)."""
import torch
import torch.nn as nn
from torch.utils.data import Dataset, TensorDataset

from foreign_resnets import TVBasicBlock, TVResNet

NOT_CALLABLE = 42


class TinyCNN(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> 2x2 average pool -> ``fc`` (found by AGC's classifier search)."""

    def __init__(self, num_classes=10, in_chans=3, width=8, dropout=0.0):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv(x))))
        return self.fc(self.drop(self.pool(x).flatten(1)))


def tiny_cnn(num_classes=10, in_chans=3, width=8, dropout=0.0):
    return TinyCNN(num_classes, in_chans, width, dropout)


class HeadNet(nn.Module):
    """A classifier under ``head`` (an MLP: its last Linear is the classifier); takes ``in_channels``."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.body = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.head = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, num_classes))

    def forward(self, x):
        return self.head(torch.relu(self.body(x)).mean((2, 3)))


class OddNames(nn.Module):
    """A classifier with a name no search finds (``out_layer``)."""

    def __init__(self, num_classes=10, in_chans=1):
        super().__init__()
        self.features = nn.Conv2d(in_chans, 6, 3, padding=1)
        self.out_layer = nn.Linear(6, num_classes)

    def forward(self, x):
        return self.out_layer(torch.relu(self.features(x)).mean((2, 3)))


class ProjNet(nn.Module):
    """timm's interface only: ``get_classifier()`` names the classifier (``proj``)."""

    def __init__(self, num_classes=10, in_chans=1):
        super().__init__()
        self.features = nn.Conv2d(in_chans, 6, 3, padding=1)
        self.proj = nn.Linear(6, num_classes)

    def get_classifier(self):
        return self.proj

    def forward(self, x):
        return self.proj(torch.relu(self.features(x)).mean((2, 3)))


def fixed_net():
    """Takes no arguments: 10 classes, 1 input channel (the digits)."""
    return TinyCNN(10, 1)


def returns_int(num_classes=10):
    return 3


def tv_small(num_classes=10, in_chans=3):
    """A torchvision-structured ResNet (BasicBlock, one block per stage, width 8)."""
    from normfree.factory import adapt_input_conv

    model = TVResNet(TVBasicBlock, [1, 1, 1, 1], num_classes=num_classes, width=8)
    if in_chans != 3:
        adapt_input_conv(model, in_chans)
    return model


def digits_tensors(n_train=256, n_test=96):
    """The built-in digits as float TensorDatasets ((train, test), with ``classes``)."""
    from normfree.data import load_dataset

    d = load_dataset("digits")
    norm = lambda x: (x.float() / 255 - d.mean.view(1, -1, 1, 1)) / d.std.view(1, -1, 1, 1)  # noqa: E731
    train = TensorDataset(norm(d.train_x[:n_train]), d.train_y[:n_train])
    test = TensorDataset(norm(d.test_x[:n_test]), d.test_y[:n_test])
    train.classes = test.classes = list(d.classes)
    return train, test


class NoisyDigits(Dataset):
    """Digits with a random transform drawn from torch's global generator (noise),
    as torchvision's random transforms do."""

    classes = list(range(10))

    def __init__(self, train: TensorDataset, noise=0.3):
        self.x, self.y = train.tensors
        self.noise = noise

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + self.noise * torch.randn_like(self.x[i]), self.y[i]
