"""Shared fixtures: a tiny autoencoder saved like a hub model, and a tiny ImageFolder with the awkward
inputs ImageNet has (grayscale, CMYK, RGBA, palette, odd sizes) plus files that cannot be read."""
import http.server
import io
import json
import os
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from models import DiT_models  # noqa: E402  (after the path is set)

TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
    sample_size=16,
)


# The reference's figures, carried in the project (tests/golden/README.md says where they come from).
GOLDEN_DIR = Path(REPO) / "tests" / "golden"


@pytest.fixture(scope="session")
def golden():
    """The reference's outputs (tests/golden/README.md lists the keys)."""
    return torch.load(GOLDEN_DIR / "dit_reference.pt", weights_only=False)


def toy(x, t, y=None, **kwargs):
    """The golden README's fixed learned-sigma denoiser: 2C output channels."""
    s = t.float().view(-1, 1, 1, 1) / 1000.0
    return torch.cat([torch.sin(x + s), torch.tanh(0.5 * x - s)], dim=1)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state (precision, process group) and refuses a second setting in the
    same process: each test that runs a script's main in-process starts from none."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


@pytest.fixture
def one_thread():
    """One torch thread for the test: exact sums, and no oversubscription of the 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FileServer(http.server.BaseHTTPRequestHandler):
    """GET /<path> answers routes[path] = (body, content type, announced Content-Length: None for the
    body's own, False for none); `requests` lists the paths asked for."""

    routes, requests = {}, []

    def do_GET(self):
        path = self.path.strip("/")
        self.requests.append(path)
        body, kind, length = self.routes[path]
        self.send_response(200)
        self.send_header("Content-Type", kind)
        if length is not False:
            self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def file_server():
    """A local HTTP server on 127.0.0.1 (the download code's only network in the tests): yields
    (base URL, FileServer) with empty routes to fill."""
    FileServer.routes, FileServer.requests = {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FileServer)
    threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True).start()  # shutdown waits one poll
    yield f"http://127.0.0.1:{httpd.server_address[1]}", FileServer
    httpd.shutdown()


@pytest.fixture(scope="session")
def tiny_vae_path(tmp_path_factory):
    """A randomly initialised 2x-downsampling AutoencoderKL written with save_pretrained (loads offline
    through vae.load_vae like a hub model would)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    # Random init gives a near-constant log-variance; spread it so stored stds differ per position.
    with torch.no_grad():
        vae.quant_conv.bias[4:] = torch.linspace(-3, 1, 4)
    path = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(path)
    return str(path)


def randomize(model, seed=0):
    """Replace every weight by small noise: at its adaLN-Zero init a DiT predicts exactly zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


SMALL_MODEL = "DiT-Digits/4"  # 4 tokens on SMALL_SIZE x SMALL_SIZE inputs: a 17 MB file, fast enough for the scripts
SMALL_SIZE = 8


def small_state_dict(in_channels=3, num_classes=10, seed=0):
    """A named model (SMALL_MODEL) on SMALL_SIZE x SMALL_SIZE inputs, randomized so that it samples something."""
    return randomize(DiT_models[SMALL_MODEL](input_size=SMALL_SIZE, in_channels=in_channels, num_classes=num_classes),
                     seed).state_dict()


def train_checkpoint(path, ema, vae="none", image_size=SMALL_SIZE, in_channels=3, scaling_factor=1.0):
    """A checkpoint in train.py's format (as checkpoints.py writes it) for small_state_dict's weights, with
    `model` != `ema`."""
    torch.save(dict(
        model={k: v + 1 for k, v in ema.items()}, ema=ema, opt={}, step=100,
        model_config=dict(model=SMALL_MODEL, input_size=SMALL_SIZE, in_channels=in_channels, num_classes=10,
                          learn_sigma=True, class_dropout_prob=0.1),
        latents=dict(vae=vae, scaling_factor=scaling_factor, image_size=image_size,
                     latent_shape=[in_channels, SMALL_SIZE, SMALL_SIZE], num_classes=10),
        train_config=dict(global_batch_size=4)), path)
    return str(path)


def released_like(size):
    """The bytes of a file with the exact keys and shapes of the released DiT-XL/2 checkpoint (from the
    golden key manifest); each tensor is one value broadcast, so the 2.7 GB model is a few KB on disk."""
    shapes = json.loads((GOLDEN_DIR / f"DiT-XL-2-{size}x{size}.keys.json").read_text())
    return torch_bytes({k: torch.full((), zlib.crc32(k.encode()) % 97 / 97.0).expand(shape)
                        for k, shape in shapes.items()})


def torch_bytes(obj):
    """What torch.save writes for obj."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _image(rng, mode, size):
    channels = 4 if "A" in mode else 3
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(arr, "RGBA" if channels == 4 else "RGB").convert(mode)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Three classes ("ant" 4 images, "bee" 4 incl. a corrupt and a truncated file, "cat" 3); returns
    (root, list of the relative paths that must be skipped)."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("images")
    specs = {
        "ant": [("a0.jpg", "RGB", (40, 30)), ("a1.png", "L", (20, 52)), ("a2.png", "RGBA", (64, 64)),
                ("a3.jpeg", "CMYK", (33, 35))],
        "bee": [("b0.png", "P", (18, 17)), ("b1.JPEG", "RGB", (100, 40)), ("b2.bmp", "RGB", (16, 16))],
        "cat": [("c0.png", "LA", (24, 30)), ("c1.jpg", "L", (50, 61)), ("c2.webp", "RGB", (31, 47))],
    }
    for cls, items in specs.items():
        os.makedirs(root / cls)
        for name, mode, size in items:
            img = _image(rng, mode, size)
            img.save(root / cls / name, quality=95) if name.lower().endswith(("jpg", "jpeg")) \
                else img.save(root / cls / name)
    (root / "bee" / "broken.jpg").write_bytes(b"this is not an image" * 10)
    full = (root / "ant" / "a0.jpg").read_bytes()
    (root / "bee" / "cut.jpg").write_bytes(full[: len(full) // 2])
    (root / "cat" / "notes.txt").write_text("not an image extension: ignored by ImageFolder")
    return str(root), ["bee/broken.jpg", "bee/cut.jpg"]


def extract_args(**overrides):
    """extract_features.py's arguments through its own parser, for calling main() in-process: the
    tests' small sizes, then `overrides` (flag names with _ for -, e.g. data_path="...", vae="none")."""
    import extract_features

    flags = dict(dict(image_size=16, batch_size=3, num_workers=0, shard_size=4), **overrides)
    argv = [a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    return extract_features.parse_args(argv)[1]


@pytest.fixture(scope="session")
def latent_store(tmp_path_factory, tiny_vae_path, image_folder):
    """A finished store of image_folder through the tiny VAE at 16x16 (latents 4x8x8), 3 shards. Encoded
    with one thread, so it is byte for byte what `OMP_NUM_THREADS=1 extract_features.py` writes under
    any number of processes (the reference of test_extract's multi-process and kill tests)."""
    import extract_features

    path = str(tmp_path_factory.mktemp("stores") / "tiny16")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract_features.main(extract_args(data_path=image_folder[0], features_path=path, vae=tiny_vae_path))
    finally:
        torch.set_num_threads(threads)
    return path


# REPA's encoder in the tests: timm's DeiT-tiny (distilled), 5.5M parameters, 2 prefix tokens (class and
# distillation) and ImageNet's mean and std, so neither can be mistaken for a ViT's 1 token and 0.5, 0.5.
REPA_ENCODER = "deit_tiny_distilled_patch16_224"


@pytest.fixture(scope="session")
def repa_weights(tmp_path_factory):
    """REPA_ENCODER with random weights as a state_dict file (what --repa-encoder-weights takes: no hub), with its
    classifier heads and its 224-px position embedding, which extraction at 32 px must resample."""
    import timm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("repa") / "encoder.pt"
    torch.save(timm.create_model(REPA_ENCODER, pretrained=False).state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def repa_store(tmp_path_factory, tiny_vae_path, image_folder, repa_weights):
    """latent_store's images and settings, plus REPA_ENCODER's features at 32 px (2 x 2 tokens of 192), encoded
    with one thread like latent_store (the reference of test_extract's kill and multi-process test)."""
    import extract_features

    path = str(tmp_path_factory.mktemp("stores") / "tiny16-repa")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract_features.main(extract_args(data_path=image_folder[0], features_path=path, vae=tiny_vae_path,
                                           repa_encoder=REPA_ENCODER, repa_encoder_weights=repa_weights,
                                           repa_input_size=32))
    finally:
        torch.set_num_threads(threads)
    return path


def smooth_frames(rng, count, height=16, width=24):
    """[count x height x width x 3] uint8: a random low-resolution picture enlarged, moving a pixel a frame."""
    small = Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8))
    picture = np.asarray(small.resize((width + count, height), Image.BICUBIC))
    return np.stack([picture[:, t:t + width] for t in range(count)])


def write_video(path, frames, codec="mpeg4"):
    """Frames [F x H x W x 3] uint8 encoded with PyAV into a video file (the container from the name)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


# extract_features' video settings in the tests: clips of 3 frames every 2nd (5 frames a clip) at 8 px.
VIDEO_FLAGS = dict(num_frames=3, frame_stride=2, image_size=8, batch_size=6, shard_size=3)


@pytest.fixture(scope="session")
def video_folder(tmp_path_factory):
    """Two classes of short 24x16 videos, UCF-101's layout: "jump" has a.mp4 (12 frames: 2 clips), b.avi
    (7: 1 clip), broken.mp4 (not a video) and short.mkv (4 frames, too short); "run" has c.mp4 (9: 1 clip)
    and d/, a folder of 10 PNG frames (2 clips). Returns (root, the videos that must be skipped)."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("videos")
    (root / "jump").mkdir()
    (root / "run" / "d").mkdir(parents=True)
    videos = {"jump/a.mp4": 12, "jump/b.avi": 7, "jump/short.mkv": 4, "run/c.mp4": 9, "run/d": 10}
    videos = {name: smooth_frames(rng, count) for name, count in videos.items()}
    for name, frames in videos.items():
        if name == "run/d":
            for t, frame in enumerate(frames):
                Image.fromarray(frame).save(root / name / f"{t:03d}.png")
        else:
            write_video(root / name, frames)
    (root / "jump" / "broken.mp4").write_bytes(b"this is not a video" * 10)
    (root / "run" / "notes.txt").write_text("not a video: ignored")
    return str(root), ["jump/broken.mp4", "jump/short.mkv"]


@pytest.fixture(scope="session")
def video_store(tmp_path_factory, tiny_vae_path, video_folder):
    """A finished store of video_folder through the tiny VAE (latents 4 x 3 x 4 x 4), 3 shards of 3 rows,
    encoded with one thread like latent_store (the reference of test_extract's kill and 2-process test)."""
    import extract_features

    path = str(tmp_path_factory.mktemp("stores") / "video8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract_features.main(extract_args(data_path=video_folder[0], features_path=path, vae=tiny_vae_path,
                                           **VIDEO_FLAGS))
    finally:
        torch.set_num_threads(threads)
    return path
