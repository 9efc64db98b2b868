"""
Encode an image folder (or a folder of videos) once into a latent store (see latents.py) that train.py reads.

    python extract_features.py --data-path /imagenet/train --features-path features/imagenet256 --image-size 256 --vae ema
    torchrun --nproc_per_node=8 extract_features.py --data-path /imagenet/train --features-path features/imagenet256 --image-size 256 --vae ema
    accelerate launch extract_features.py --data-path /imagenet/train --features-path features/imagenet256 --image-size 256 --vae ema
    python extract_features.py --data-path tiny/train --features-path features/tiny32px --image-size 32 --vae none
    python extract_features.py --fast-dit-path fast-dit/features --features-path features/imagenet256 --image-size 256 --vae ema
    python extract_features.py --data-path /imagenet/train --features-path features/imagenet256-dinov2 --image-size 256 --vae ema --repa-encoder vit_base_patch14_dinov2.lvd142m --repa-encoder-weights dinov2-b.safetensors
    python extract_features.py --data-path UCF-101 --features-path features/ucf101-16x3 --image-size 256 --vae ema --num-frames 16 --frame-stride 3

Every image goes through DiT's preprocessing (RGB, ADM center crop, [-1, 1]); it and its mirror
image are encoded, and the posterior's mean and standard deviation are stored, so training draws a
random flip and a fresh posterior sample each step as DiT's online encoding did. With `--vae none`
the images themselves are stored (pixel-space models; flips are exact there).

Rows follow the sorted ImageFolder order and are cut into fixed shards of --shard-size rows, handed
to the processes round-robin: the store is the same for any number of processes. A killed run,
rerun with the same command, continues from the last finished chunk; a finished store is left as it
is (a damaged shard or labels.npy in it is written again); a store made with other settings or
inputs is refused; a second run on a store that one is writing stops at once. Each shard's disk
space is reserved when it is created, so a full disk is an error at the start, not a crash later.
Unreadable images, images over --max-image-pixels and float images outside [0, 1] are skipped,
logged and listed in meta.json; 16-bit images are scaled to 8 bits. Links in the image folder are
followed as torchvision's ImageFolder follows them; a loop of links is refused, naming the link.
`--fast-dit-path` converts fast-DiT's `*_features/*.npy` + `*_labels/*.npy` folders (one frozen flip
and posterior sample per image, already scaled by 0.18215) into a store instead.

`--repa-encoder NAME` (a timm ViT, e.g. vit_base_patch14_dinov2.lvd142m) also stores that frozen
encoder's patch tokens of both views, for train.py's REPA alignment (sihyun-yu/REPA): the image
in [0, 1], resized bicubically to --repa-input-size (default REPA's: 224 for 256-px images),
normalised with the encoder's mean and std, and the encoder's final-norm tokens after its class
and register tokens, in float16. DINOv2-B at 256 px: 256 tokens x 768 channels x 2 bytes = 384 KiB
a view, 768 KiB an image (the latents take 4 x 32 x 32 x 2 values x 2 views x 2 bytes = 32 KiB).

`--num-frames F` reads videos instead, one sub-folder per class as UCF-101 is laid out: video files
(.mp4 .avi .webm .mkv .mov, decoded with PyAV) and folders of frames (a video's frames as images,
in name order). A row of the store is a clip of F frames, every --frame-stride S-th frame, so it
spans (F - 1) x S + 1 frames; each frame goes through the images' preprocessing and the autoencoder
(both views: the whole clip mirrored), giving rows [V, K, C, F, h, w]. A video gives every clip that
fits without overlapping (at most --clips-per-video), spread evenly over it; one that holds no
clip (too short, or broken) is skipped and listed. Latte draws one clip at a random start from each
video every epoch; fixed clips give up that variety (the same few windows of a video, each at one
phase of the stride, every epoch), because a random start needs every frame of every video encoded
and stored, S times the frames that non-overlapping clips use, where fixed clips encode only the
frames they hold; in exchange an epoch sees all of a video's clips, not one. The frames of every
video are counted on rank 0 before anything is encoded (a file's packets are read, not decoded), so
the rows are known and the store does not depend on the number of processes; meta["clips"] names
each row's video and first frame. At 256 px with a KL-f8 autoencoder in float16 a clip of 16 frames
takes 4 x 16 x 32 x 32 x 2 (mean, std) x 2 views x 2 bytes = 512 KiB.
"""
import argparse
import contextlib
import glob
import hashlib
import os
import time
import warnings
from typing import NamedTuple

import av
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, reduce
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import latents
from files import run_script, sweep_temp_files
from latents import StoreError, shown
from vae import center_crop_arr, downsampling_factor, load_vae, scaling_factor

# fast-DiT multiplies its stored latents by this constant (not read from the VAE config).
FAST_DIT_SCALING_FACTOR = 0.18215
# The file names torchvision's ImageFolder lists (torchvision.datasets.folder.IMG_EXTENSIONS; a test checks
# they agree). Not imported from there: importing torchvision loads torch._dynamo, seconds per process.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Latte's frame_interval for UCF-101 (Vchitect/Latte configs/ucf101/ucf101_train.yaml: 16 frames, every 3rd).
LATTE_FRAME_STRIDE = 3
# The video files a class folder of --num-frames input holds (PyAV decodes them; folders of frames beside them).
VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov")
# The white level of the high-bit-depth modes Pillow opens (16-bit PNG and TIFF, float TIFF):
# Image.convert("RGB") clips these to 255 instead of scaling them (a 16-bit image comes out white).
WHITE_LEVEL = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "F": 1.0}


class UnusableImage(Exception):
    """An image that decodes but is not used (too large, pixels of unknown range): skipped and listed."""


def to_rgb(img):
    """The image as 8-bit RGB: high-bit-depth grayscale scaled from its white level (not clipped).
    :raises UnusableImage: float pixels outside [0, 1], or 32-bit integer pixels (no known white)."""
    if img.mode in WHITE_LEVEL:
        white = WHITE_LEVEL[img.mode]
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = arr.min(), arr.max()
        if not 0 <= lo <= hi <= white:  # also false for NaN
            raise UnusableImage(f"{img.mode} pixels in [{lo:g}, {hi:g}], outside [0, {white:g}]")
        img = Image.fromarray(np.round(arr * (255 / white)).astype(np.uint8), "L")
    elif img.mode == "I":
        raise UnusableImage("32-bit integer pixels: no known white level")
    return img.convert("RGB")


def to_tensor(img):
    """DiT's training transform without its RandomHorizontalFlip (both orientations are stored):
    torchvision's ToTensor then Normalize(0.5, 0.5), in the same float32 steps, so the same numbers.
    :return: [3 x S x S] float32 in [-1, 1]."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, S, S)
    return x.float().div(255).sub_(0.5).div_(0.5)


def check_pixels(width, height, max_pixels):
    """:raises UnusableImage: a picture over --max-image-pixels (checked before it is decoded)."""
    if width * height > max_pixels:
        raise UnusableImage(f"{width}x{height} = {width * height:,} pixels, over --max-image-pixels {max_pixels:,}")


def load_image(path, image_size, max_pixels):
    """An image file through DiT's preprocessing. :return: [3 x S x S] float32 in [-1, 1].
    :raises UnusableImage: see to_rgb and check_pixels; any exception of a decoder that fails."""
    with warnings.catch_warnings():
        # The size check below replaces Pillow's warning (it would decode such an image anyway).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:  # reads the header only: the size is known, not decoded
            check_pixels(img.width, img.height, max_pixels)
            return to_tensor(center_crop_arr(to_rgb(img), image_size))


def failure(error):
    """The skip message of an exception raised while reading an input."""
    return shown(str(error) if isinstance(error, UnusableImage) else f"{type(error).__name__}: {error}")


class ImageItems(Dataset):
    """Preprocessed images by global index: (index, [3 x S x S] tensor in [-1, 1], error message).
    An unusable image gives a zero tensor and a non-empty message instead of an exception, so one
    bad file does not stop a long extraction."""

    def __init__(self, files, image_size, max_pixels):
        self.files = files
        self.image_size = image_size
        self.max_pixels = max_pixels
        self.shape = (3, image_size, image_size)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return i, load_image(self.files[i], self.image_size, self.max_pixels), ""
        except Exception as e:  # any decoder failure (truncated, not an image, bad header) skips it
            return i, torch.zeros(self.shape), failure(e)


class FastDiTItems(Dataset):
    """fast-DiT feature files by global index: (index, [C x h x w] float32 tensor, error message)."""

    def __init__(self, files, latent_shape):
        self.files = files
        self.shape = tuple(latent_shape)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            x = np.load(self.files[i]).astype(np.float32).reshape(self.shape)
            return i, torch.from_numpy(x), ""
        except Exception as e:  # unreadable or wrongly shaped file: skip it like a corrupt image
            return i, torch.zeros(self.shape), shown(f"{type(e).__name__}: {e}")


class Video(NamedTuple):
    """A video of the input folder: a file PyAV decodes (frames None), or a folder of frames (their image
    files, sorted by name)."""
    path: str
    frames: tuple | None


def scan_videos(data_path):
    """
    The videos of a folder laid out as UCF-101: one sub-folder per class (sorted), in each the video
    files (VIDEO_EXTENSIONS) and folders of frames, sorted by name together; links followed.

    :return: (videos, labels, class names).
    :raises StoreError: no class folders, or no videos in any of them.
    """
    if not os.path.isdir(data_path):
        raise StoreError(f"--data-path {data_path} is not a folder")
    classes = sorted(e.name for e in os.scandir(data_path) if e.is_dir())
    if not classes:
        raise StoreError(f"--data-path {data_path} has no sub-folders (expected one sub-folder per class, "
                         f"holding its videos)")
    videos, labels = [], []
    for label, name in enumerate(classes):
        for entry in sorted(os.scandir(os.path.join(data_path, name)), key=lambda e: e.name):
            if entry.is_dir():
                frames = sorted(n for n in os.listdir(entry.path) if n.lower().endswith(IMG_EXTENSIONS))
                videos.append(Video(entry.path, tuple(os.path.join(entry.path, n) for n in frames)))
            elif entry.name.lower().endswith(VIDEO_EXTENSIONS):
                videos.append(Video(entry.path, None))
            else:
                continue
            labels.append(label)
    if not videos:
        raise StoreError(f"--data-path {data_path}: no videos ({', '.join(VIDEO_EXTENSIONS)}) or folders of "
                         f"frames in its {len(classes)} class folders")
    return videos, labels, classes


def count_frames(video, max_pixels):
    """
    Frames of a video: its frame files, or the packets of a file's first video stream (read, not decoded:
    one packet a frame for the codecs of video files; a clip that finds fewer when decoded is skipped).

    :raises UnusableImage: frames over --max-image-pixels; PyAV's errors for a file it cannot open.
    """
    if video.frames is not None:
        return len(video.frames)
    with av.open(video.path) as container:
        if not container.streams.video:
            raise UnusableImage("no video stream")
        stream = container.streams.video[0]
        check_pixels(stream.codec_context.width, stream.codec_context.height, max_pixels)
        return sum(1 for packet in container.demux(stream) if packet.size)


def clip_starts(length, frames, stride, most):
    """
    The first frames of the clips cut from a video of `length` frames: clips of `frames` frames every
    `stride`-th one, as many as fit without overlapping (at most `most`, None for no limit), spread
    evenly from the first frame to the last (one clip: the middle one).

    :return: the start frames, in time order; empty when the video is shorter than one clip.
    """
    span = (frames - 1) * stride + 1
    count = length // span if most is None else min(most, length // span)
    if count == 1:
        return [(length - span) // 2]
    # Gaps of (length - span) / (count - 1) >= span frames, rounded down: the clips never overlap.
    return [j * (length - span) // (count - 1) for j in range(count)]


def plan_clips(videos, frames, stride, most, max_pixels):
    """
    The store's rows: one per clip of every video in order, (video index, start frame, ""), and one
    per video that gives no clip, (video index, None, why), which the store lists as skipped.
    """
    span = (frames - 1) * stride + 1
    rows = []
    for v, video in enumerate(tqdm(videos, unit="video", desc="counting frames", leave=False)):
        try:
            length = count_frames(video, max_pixels)
        except Exception as e:  # not a video PyAV can read (broken, truncated, no video stream) skips it
            rows.append((v, None, failure(e)))
            continue
        starts = clip_starts(length, frames, stride, most)
        if not starts:
            short = f"{length} frames, too short for a clip of {frames} frames every {stride}: it needs {span}"
            rows.append((v, None, short + " = (frames - 1) x stride + 1"))
        rows += [(v, start, "") for start in starts]
    return rows


class ClipItems(Dataset):
    """
    Clips by global row: (row, [3 x F x S x S] tensor in [-1, 1], error message), each frame through
    DiT's preprocessing as an image. A video file is decoded from its start up to the clip's last frame,
    keeping only the clip's frames; the decoder stays open for the next row, so the clips of one video
    (consecutive rows, in time order) decode it once.
    """

    def __init__(self, videos, rows, frames, stride, image_size, max_pixels):
        self.videos, self.rows = videos, rows
        self.frames, self.stride = frames, stride
        self.image_size, self.max_pixels = image_size, max_pixels
        self.shape = (3, frames, image_size, image_size)
        self._decoder = None  # (video index, container, its frames, index of the next frame)

    def __len__(self):
        return len(self.rows)

    def __getstate__(self):
        return dict(self.__dict__, _decoder=None)  # each DataLoader worker opens its own

    def __getitem__(self, i):
        v, start, error = self.rows[i]
        if error:
            return i, torch.zeros(self.shape), error
        wanted = range(start, start + (self.frames - 1) * self.stride + 1, self.stride)
        video = self.videos[v]
        try:
            if video.frames is None:
                frames = [to_tensor(center_crop_arr(img, self.image_size)) for img in self.decode(v, wanted)]
            else:
                frames = [load_image(video.frames[f], self.image_size, self.max_pixels) for f in wanted]
            return i, torch.stack(frames, 1), ""  # (3, F, S, S)
        except Exception as e:  # a frame that cannot be decoded or read skips the clip
            self.close()
            return i, torch.zeros(self.shape), failure(e)

    def decode(self, v, wanted):
        """:return: the frames `wanted` (a range) of video file v as RGB images."""
        if self._decoder is None or self._decoder[0] != v or self._decoder[3] > wanted[0]:
            self.close()
            container = av.open(self.videos[v].path)
            self._decoder = [v, container, container.decode(container.streams.video[0]), 0]
        images = []
        for frame in self._decoder[2]:
            index = self._decoder[3]
            self._decoder[3] += 1
            if index in wanted:
                images.append(frame.to_image())  # RGB
                if index == wanted[-1]:
                    return images
        raise UnusableImage(f"the video ends at {self._decoder[3]} decodable frames, before this clip's "
                            f"frame {wanted[-1]}")

    def close(self):
        if self._decoder is not None:
            self._decoder[1].close()
            self._decoder = None


def check_output_path(features_path, input_path):
    """Refuse, before any work, an output path that cannot become the store.
    :raises StoreError: it is a file or a dangling link, sits under one or under an unwritable folder, or
            inside the input."""
    path = os.path.abspath(features_path)
    not_a_folder = lambda p: "a link to nothing" if not os.path.exists(p) else "a file, not a folder"  # noqa: E731
    if os.path.lexists(path) and not os.path.isdir(path):
        raise StoreError(f"--features-path {features_path} is {not_a_folder(path)}")
    parent = path
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise StoreError(f"--features-path {features_path}: {parent} is {not_a_folder(parent)}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(f"--features-path {features_path}: no permission to write in {parent}")
    inside = os.path.realpath(path)
    source = os.path.realpath(input_path)
    if inside == source or inside.startswith(source + os.sep):
        raise StoreError(f"--features-path {features_path} is inside the input folder {input_path}: the "
                         f"store would become part of its own input; choose a folder outside it")


def scan_images(data_path):
    """
    The ImageFolder listing in torchvision's order (classes sorted; in each, every folder reached
    with links followed, sorted by path; files sorted in each folder).

    :return: (files, labels, class names).
    :raises StoreError: no class folders or no images, or a loop of links (see class_folders).
    """
    if not os.path.isdir(data_path):
        raise StoreError(f"--data-path {data_path} is not a folder")
    classes = sorted(e.name for e in os.scandir(data_path) if e.is_dir())
    if not classes:
        raise StoreError(f"--data-path {data_path} has no sub-folders (expected one sub-folder per class)")
    files, labels = [], []
    for label, name in enumerate(classes):
        for folder, names in class_folders(data_path, name):
            found = [os.path.join(folder, n) for n in names if n.lower().endswith(IMG_EXTENSIONS)]
            files += found
            labels += [label] * len(found)
    if not files:
        raise StoreError(f"--data-path {data_path}: no images ({', '.join(IMG_EXTENSIONS)}) "
                         f"in its {len(classes)} class folders")
    return files, labels, classes


def class_folders(data_path, name):
    """
    (folder, sorted names of the files in it) for class folder `name` and every folder under it,
    links followed, sorted by folder path: what torchvision's make_dataset walks.

    A link that leads back to a folder on its own path (`ln -s . loop`) is refused, not listed once:
    a loop has no listing to agree with (torchvision's walk repeats the files under it until the
    path grows too long, and two loops make that walk never end), while any other link keeps
    ImageFolder's meaning, one sample per path, even where two classes link to one file; so
    deduplicating files by inode would change what those folders mean.

    :raises StoreError: a loop, naming the link.
    """
    def enter(folder, outer):  # outer: (st_dev, st_ino) of the folders `folder` is in
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in outer:
            raise StoreError(f"--data-path {data_path}: {folder} leads back to {os.path.realpath(folder)}, "
                             f"a folder it is in: a loop of links, which would list its files without end; "
                             f"remove that link")
        return outer | {(st.st_dev, st.st_ino)}

    top = os.path.join(data_path, name)
    outer = {top: enter(top, enter(data_path, frozenset()))}
    listing = []
    for folder, subfolders, names in os.walk(top, followlinks=True):
        listing.append((folder, sorted(names)))
        inside = outer.pop(folder)
        for sub in sorted(subfolders):
            try:
                outer[os.path.join(folder, sub)] = enter(os.path.join(folder, sub), inside)
            except OSError:  # gone or unreadable, as os.walk would find it: not walked
                subfolders.remove(sub)
    return sorted(listing)


def read_fast_dit_label(path):
    """The one class index in a fast-DiT label file. :raises StoreError: anything else (an object array
    is refused by np.load, never unpickled)."""
    try:
        label = np.load(path)
    except (OSError, ValueError) as e:
        raise StoreError(f"{path} is not a label file ({e}); fast-DiT writes one integer per file") from e
    if label.size != 1 or not np.issubdtype(label.dtype, np.integer) or label.reshape(-1)[0] < 0:
        raise StoreError(f"{path} holds {label.dtype} {label.shape} {label.reshape(-1)[:3].tolist()}, "
                         f"not one class index")
    return int(label.reshape(-1)[0])


def scan_fast_dit(path):
    """fast-DiT's `<path>/<name>_features/*.npy` with labels in `<path>/<name>_labels/*.npy`, paired
    by file name and ordered by the number in it (fast-DiT names files by step).
    :return: (feature files, labels, latent shape [C, h, w])."""
    feature_dirs = sorted(glob.glob(os.path.join(path, "*_features")))
    if len(feature_dirs) != 1:
        raise StoreError(f"--fast-dit-path {path}: expected exactly one *_features folder, "
                         f"found {len(feature_dirs)}")
    label_dir = feature_dirs[0][: -len("_features")] + "_labels"
    names = [n for n in os.listdir(feature_dirs[0]) if n.endswith(".npy")]
    if not names:
        raise StoreError(f"{feature_dirs[0]} holds no .npy files")
    stems = [n[:-4] for n in names]
    names = [n for _, n in sorted(zip([int(s) if s.isdigit() else s for s in stems], names),
                                  key=lambda t: (isinstance(t[0], str), t[0]))]
    missing = [n for n in names if not os.path.isfile(os.path.join(label_dir, n))]
    if missing:
        raise StoreError(f"{len(missing)} features have no label file in {label_dir} "
                         f"(first: {missing[0]})")
    labels = [read_fast_dit_label(os.path.join(label_dir, n)) for n in names]
    files = [os.path.join(feature_dirs[0], n) for n in names]
    try:
        latent_shape = list(np.load(files[0], mmap_mode="r").shape[-3:])
    except (OSError, ValueError) as e:
        raise StoreError(f"{files[0]} is not a feature array ({e})") from e
    return files, labels, latent_shape


@contextlib.contextmanager
def store_lock(path, state):
    """
    Hold the store's lock (latents.lock_store) while this run writes it: rank 0 holds it for all
    processes of the run.

    :raises StoreError: on every process, when another run holds the lock.
    """
    holder, message = None, None
    if state.is_main_process:
        try:
            holder = latents.lock_store(path)
        except StoreError as e:
            message = str(e)
    message = broadcast_object_list([message])[0]
    if message:
        raise StoreError(message)
    try:
        yield
    finally:
        if holder is not None:
            holder.close()


class RepaEncoder:
    """
    A frozen timm ViT's patch tokens of our images, as REPA aligns a DiT block with them.

    REPA (sihyun-yu/REPA@67f7145, train.py preprocess_raw_image) feeds DINOv2 the 0..1 image
    normalised with ImageNet's mean and std, resized with F.interpolate(mode="bicubic") to 224 at
    256 px, and takes x_norm_patchtokens. We normalise after resizing, with the encoder's own
    pretrained mean and std (ImageNet's for DINOv2): both steps are linear, so the order changes
    nothing but rounding. No antialiasing, as REPA (torchvision's tensor Resize would antialias); at
    the same size the bicubic resize is the identity, to the bit.
    """

    def __init__(self, model, input_size, prefix_tokens, mean, std):
        self.model, self.input_size, self.prefix_tokens = model, input_size, prefix_tokens
        param = next(model.parameters())
        self.mean = torch.tensor(mean, device=param.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=param.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, x):
        """:param x: [B x 3 x S x S] images in [-1, 1]. :return: [B x T x D] float32 patch tokens."""
        x = (x.to(self.mean.device) + 1) / 2                                          # (B, 3, S, S) in [0, 1]
        x = F.interpolate(x, size=(self.input_size,) * 2, mode="bicubic", align_corners=False)  # (B, 3, N, N)
        x = (x - self.mean) / self.std
        return self.model.forward_features(x)[:, self.prefix_tokens:].float()      # (B, T, D)


def load_repa_encoder(name, weights, input_size, image_size, device):
    """
    Build the timm encoder `name` for REPA features, its weights from the file `weights` (a state_dict,
    as .pth or .safetensors) or, when None, from timm's hub download. timm's own loading resamples a
    position embedding made for another input size.

    :param input_size: the encoder's input side, or None for REPA's: image_size * 224 / 256 rounded
           to a multiple of the encoder's patch (224 at 256 px, 448 at 512 px).
    :return: (RepaEncoder on device, meta["repa"] settings).
    :raises StoreError: an unknown name, an encoder without a patch grid, an input size that is not a
            multiple of its patch, weights that do not fit it or are not finite, or no hub.
    """
    import timm  # imported here: it loads torchvision and torch._dynamo, seconds that other runs do not pay

    if not timm.is_model(name):
        raise StoreError(f"--repa-encoder {name} is not a timm model name (e.g. vit_base_patch14_dinov2.lvd142m; "
                         f"timm.list_models('*dinov2*') lists more)")
    if input_size is None:
        input_size = repa_input_size(timm, name, image_size)
    model = build_repa_encoder(timm, name, weights, input_size).to(device).eval().requires_grad_(False)
    patch = patch_size(model, name)
    if input_size % patch[0] or input_size % patch[1]:
        raise StoreError(f"--repa-input-size {input_size} is not a multiple of {name}'s patch "
                         f"{patch[0]}x{patch[1]}")
    grid, prefix = [input_size // patch[0], input_size // patch[1]], model.num_prefix_tokens
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise StoreError(f"--repa-encoder {name}: its weights ({weights or 'from the hub'}) hold non-finite values")
    with torch.no_grad():  # one blank image: the token layout the store will hold
        tokens = model.forward_features(torch.zeros(1, 3, input_size, input_size, device=device))
    if tokens.dim() != 3 or tokens.shape[1] != prefix + grid[0] * grid[1]:
        raise StoreError(f"{not_vit(name)}: its forward_features gives {tuple(tokens.shape)} at {input_size} px, "
                         f"not [1, {prefix} + {grid[0]} x {grid[1]}, D]")
    data = timm.data.resolve_data_config({}, model=model)
    source = (f"sha256:{sha256_file(weights)}" if weights else
              f"timm hub {model.pretrained_cfg.get('hf_hub_id') or model.pretrained_cfg.get('url')}")
    settings = latents.repa_settings(name, source, input_size, grid, int(tokens.shape[2]),
                                     [float(m) for m in data["mean"]], [float(s) for s in data["std"]])
    return RepaEncoder(model, input_size, prefix, settings["mean"], settings["std"]), settings


def not_vit(name):
    return (f"--repa-encoder {name} is not a ViT-like timm encoder with a patch grid (patch_embed.grid_size, "
            f"num_prefix_tokens): REPA aligns the DiT's tokens with such an encoder's patch tokens")


def patch_size(model, name):
    """:return: (height, width) of the ViT-like model's patches. :raises StoreError: not ViT-like."""
    patch_embed = getattr(model, "patch_embed", None)
    if not all(hasattr(m, a) for m, a in ((patch_embed, "grid_size"), (patch_embed, "patch_size"),
                                          (model, "num_prefix_tokens"))):
        raise StoreError(not_vit(name))
    return tuple(patch_embed.patch_size)


def repa_input_size(timm, name, image_size):
    """REPA's input side for image_size-px images: image_size * 224 / 256 to the nearest multiple of the
    encoder's patch (from the model built on the meta device: no weights, no memory)."""
    try:
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False, num_classes=0)
    except (RuntimeError, TypeError, ValueError) as e:
        raise StoreError(f"--repa-encoder {name}: timm cannot build it ({one_line(e)})") from e
    patch = max(patch_size(probe, name))
    return max(1, round(image_size * 224 / 256 / patch)) * patch


def build_repa_encoder(timm, name, weights, input_size):
    """
    timm's model `name` at input_size without its classifier, pretrained weights loaded strictly.

    :raises StoreError: a model that takes no img_size (not ViT-like), a file that is not a state_dict
            of it, or no hub (weights None).
    """
    def create(**kwargs):
        try:
            return timm.create_model(name, pretrained=True, num_classes=0, img_size=input_size, **kwargs)
        except TypeError as e:  # raised by the constructor, before any weights are read or downloaded
            if "img_size" not in str(e):
                raise
            raise StoreError(not_vit(name)) from e
    if weights is None:
        try:
            return create()
        except (OSError, RuntimeError) as e:  # hub and network errors are OSErrors; no weights a RuntimeError
            raise StoreError(f"--repa-encoder {name}: cannot get its weights from timm's hub ({one_line(e)}); "
                             f"on a machine without the hub, give them as a file: --repa-encoder-weights "
                             f"PATH") from e
    if not os.path.isfile(weights):
        raise StoreError(f"--repa-encoder-weights {weights} is not a file")
    from timm.models import get_pretrained_cfg, load_state_dict

    try:
        state_dict = load_state_dict(weights, weights_only=True)  # no unpickling of arbitrary objects
    except Exception as e:  # torch.load and safetensors raise many kinds for a file that is not theirs
        raise StoreError(f"--repa-encoder-weights {weights} is not a state_dict file ({one_line(e)})") from e
    # The classifier is dropped here, not by timm: timm loads non-strictly when num_classes differs from
    # the weights' (as it does for num_classes=0), and a file missing a key would leave that layer random.
    heads = getattr(get_pretrained_cfg(name), "classifier", None) or ()
    for head in (heads,) if isinstance(heads, str) else heads:
        for key in (f"{head}.weight", f"{head}.bias"):
            state_dict.pop(key, None)
    try:
        return create(pretrained_cfg_overlay=dict(state_dict=state_dict, num_classes=0))
    except StoreError:
        raise
    except (RuntimeError, KeyError, ValueError) as e:  # missing, unexpected or mis-shaped keys
        raise StoreError(f"--repa-encoder-weights {weights} does not fit {name} ({one_line(e)})") from e


def sha256_file(path):
    """Hex SHA-256 of a file's bytes, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(2**20), b""):
            h.update(piece)
    return h.hexdigest()


def one_line(error):
    """An exception's message on one line (torch's load errors span several), cut to 300 characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


class Encoder:
    """Turns a batch of source items into store rows [B x V x K x C x h x w] (float32) and, with a
    RepaEncoder, the encoder features of both views [B x 2 x T x D] (else None). Clips [B x 3 x F x S x S]
    become rows [B x V x K x C x F x h x w], their frames encoded as images, `frames_per_call` at most
    (and as many mirrored frames) in one autoencoder call."""

    def __init__(self, vae, source, repa=None, frames_per_call=None):
        self.vae = vae
        self.source = source
        self.repa = repa
        self.frames_per_call = frames_per_call

    @torch.no_grad()
    def __call__(self, x):
        features = None
        if self.repa is not None:
            b = x.shape[0]
            tokens = self.repa(torch.cat([x, x.flip(-1)]))                        # (2B, T, D)
            features = torch.stack([tokens[:b], tokens[b:]], 1)                  # (B, 2 views, T, D)
        return self.rows(x), features

    def rows(self, x):
        if self.source == "fast-dit":
            return (x / FAST_DIT_SCALING_FACTOR)[:, None, None]  # (B, 1, 1, C, h, w)
        if self.vae is None:
            return x[:, None, None]                              # (B, 1, 1, 3, [F,] S, S)
        if x.dim() == 5:
            b, _, f, s, _ = x.shape
            frames = x.transpose(1, 2).reshape(b * f, 3, s, s)   # (B*F, 3, S, S)
            rows = torch.cat([self.rows(part) for part in frames.split(self.frames_per_call)])  # (B*F, 2, 2, C, h, w)
            return rows.unflatten(0, (b, f)).permute(0, 2, 3, 4, 1, 5, 6)  # (B, 2 views, 2, C, F, h, w)
        param = next(self.vae.parameters())
        posterior = self.vae.encode(torch.cat([x, x.flip(-1)]).to(param.device, param.dtype)).latent_dist
        mean, std = posterior.mean.float(), posterior.std.float()  # (2B, C, h, w)
        b = x.shape[0]
        out = torch.stack([torch.stack([mean[:b], std[:b]], 1),
                           torch.stack([mean[b:], std[b:]], 1)], 1)  # (B, 2 views, 2, C, h, w)
        return out


def read_inputs(args, state):
    """
    List the inputs and load what encodes them.

    :return: (items Dataset, files (each row's input), labels (each row's), class names, input root,
              Encoder, settings dict).
    """
    clips, identity = None, None  # identity: the files whose names, sizes and times identify the inputs
    if args.fast_dit_path:
        files, labels, latent_shape = scan_fast_dit(args.fast_dit_path)
        class_names = [str(c) for c in range(max(labels) + 1)]
        source, root, vae, sf = "fast-dit", args.fast_dit_path, None, FAST_DIT_SCALING_FACTOR
        items = FastDiTItems(files, latent_shape)
    else:
        if args.num_frames:
            videos, video_labels, class_names = scan_videos(args.data_path)
            source = "videos"
            # Counted on rank 0 only, as the digest below: every video is read once, not once per process.
            rows = broadcast_object_list([plan_clips(videos, args.num_frames, args.frame_stride,
                                                     args.clips_per_video, args.max_image_pixels)
                                          if state.is_main_process else None])[0]
            files, labels = [videos[v].path for v, _, _ in rows], [video_labels[v] for v, _, _ in rows]
            clips = [[shown(os.path.relpath(videos[v].path, args.data_path)), start] for v, start, _ in rows]
            identity = [(f, y) for video, y in zip(videos, video_labels) for f in video.frames or [video.path]]
            items = ClipItems(videos, rows, args.num_frames, args.frame_stride, args.image_size,
                              args.max_image_pixels)
        else:
            files, labels, class_names = scan_images(args.data_path)
            source = "images"
            items = ImageItems(files, args.image_size, args.max_image_pixels)
        root = args.data_path
        vae = load_vae(args.vae, device=state.device)
        sf = scaling_factor(vae)
        down = downsampling_factor(vae)
        if args.image_size % down:
            raise StoreError(f"--image-size {args.image_size} is not a multiple of the "
                             f"autoencoder's downsampling factor {down}")
        channels = 3 if vae is None else vae.config.latent_channels
        latent_shape = [channels] + [args.num_frames] * bool(args.num_frames) + [args.image_size // down] * 2
    repa, repa_settings = (load_repa_encoder(args.repa_encoder, args.repa_encoder_weights, args.repa_input_size,
                                             args.image_size, state.device) if args.repa_encoder else (None, None))
    flip = latents.FLIP_NONE if source == "fast-dit" else latents.FLIP_EXACT if vae is None else latents.FLIP_ENCODED
    files_of, labels_of = zip(*identity) if identity else (files, labels)
    settings = {
        "format": latents.FORMAT_VERSION, "source": source, "vae": args.vae, "scaling_factor": sf,
        "image_size": args.image_size, "latent_shape": latent_shape, "dtype": args.dtype,
        "views": 2 if flip == latents.FLIP_ENCODED else 1, "posterior": vae is not None,
        "flip": flip, "shard_size": args.shard_size, "rows": len(files),
        # One stat() per input file, on rank 0 only: the file server answers once, not once per process.
        "files_sha1": broadcast_object_list([latents.inputs_digest(files_of, labels_of, root)
                                             if state.is_main_process else None])[0],
        "repa": repa_settings, "frames": args.num_frames, "frame_stride": args.num_frames and args.frame_stride,
        "clips_per_video": args.num_frames and args.clips_per_video,
    }
    if clips is not None:
        settings["clips"] = clips  # not a setting to compare: the settings and the inputs' identity fix it
    encode = Encoder(vae, source, repa, frames_per_call=args.batch_size)
    return items, files, labels, [shown(c) for c in class_names], root, encode, settings


def main(args):
    """Write (or continue) the store args.features_path; :return: its meta dict."""
    state = PartialState(cpu=not torch.cuda.is_available())
    log = print if state.is_main_process else (lambda *a, **k: None)

    check_output_path(args.features_path, args.fast_dit_path or args.data_path)
    items, files, labels, class_names, root, encode, settings = read_inputs(args, state)
    if settings["repa"]:
        r = settings["repa"]
        log(f"REPA features: {r['encoder']} at {r['input_size']} px, {r['grid'][0]}x{r['grid'][1]} tokens of "
            f"{r['dim']} in {r['dtype']}: {r['bytes_per_image'] / 2 / 1024:,.1f} KiB a view, "
            f"{r['bytes_per_image'] / 1024:,.1f} KiB an image (both views)")
    if settings["frames"]:
        log(clip_size(settings))
    noun = "clips" if settings["frames"] else "images"
    existing = latents.read_existing(args.features_path, settings)
    if existing is not None and existing["complete"] and not latents.store_problems(args.features_path, existing):
        log(f"{args.features_path} is already complete ({existing['count']} {noun}): nothing to do")
        return existing
    with store_lock(args.features_path, state):
        # Read again under the lock: another run may have finished or extended the store meanwhile.
        existing = latents.read_existing(args.features_path, settings)
        if existing is not None and existing["complete"]:
            problems = latents.store_problems(args.features_path, existing)
            if not problems:
                log(f"{args.features_path} is already complete ({existing['count']} {noun}): nothing to do")
                return existing
            for name, problem in problems.items():
                log(f"{name} {problem}: writing it again")
        meta = latents.new_meta(settings, class_names, shown(os.path.abspath(root)))
        state.wait_for_everyone()  # every process has checked the folder before anyone writes to it
        if state.is_main_process:
            for name in sweep_temp_files(args.features_path):
                log(f"removed {name}, left by a run that was killed")
            latents.start_store(args.features_path, meta, labels)
        state.wait_for_everyone()
        encoded, secs = encode_shards(args, state, items, files, encode, meta)
        if state.is_main_process:
            meta, skipped = latents.finish_store(args.features_path, meta, files, root)
            log(f"done: {meta['count']} {noun} stored, {len(skipped)} skipped; this run encoded {encoded} in "
                f"{secs:.1f}s ({encoded / max(secs, 1e-9):.1f} {noun}/s over {state.num_processes} processes)")
            for s in skipped:
                log(f"  skipped {s['path']}: {s['error']}")
        state.wait_for_everyone()
    return latents.read_json(os.path.join(args.features_path, latents.META_FILE))


def clip_size(settings):
    """The store's bytes a clip, written out: C x F x h x w values x K x V x bytes a value."""
    shape, k, v = settings["latent_shape"], 2 if settings["posterior"] else 1, settings["views"]
    size = int(np.prod(shape)) * k * v * np.dtype(settings["dtype"]).itemsize
    return (f"clips of {settings['frames']} frames every {settings['frame_stride']}: {' x '.join(map(str, shape))} "
            f"values x {k} ({'mean, std' if k == 2 else 'no posterior'}) x {v} view{'s' * (v > 1)} x "
            f"{np.dtype(settings['dtype']).itemsize} bytes = {size / 1024:,.1f} KiB a clip")


def encode_shards(args, state, items, files, encode, meta):
    """Encode this process's shards (round-robin) batch by batch, committing progress per batch;
    batches never cross a shard, so progress is per shard. A batch holds --batch-size images, or as many
    clips as hold --batch-size frames (one at least).
    :return: (rows encoded by all processes in this run, seconds)."""
    rank, world, num_shards = state.process_index, state.num_processes, len(meta["shards"])
    shards = latents.open_shards(args.features_path, meta, range(rank, num_shards, world))
    batch = max(1, args.batch_size // (args.num_frames or 1))
    todo = [list(range(w.lo + s, w.lo + min(s + batch, w.rows)))
            for w in shards.values() for s in range(w.done, w.rows, batch)]
    if state.is_main_process:
        print(f"{len(files)} inputs in {meta['num_classes']} classes -> {args.features_path}: "
              f"{num_shards} shards over {world} processes; rank 0 has {sum(map(len, todo))} left to encode")
    loader = DataLoader(items, batch_sampler=todo, num_workers=args.num_workers,
                        pin_memory=torch.cuda.is_available())
    start, encoded = time.time(), 0
    with tqdm(total=sum(map(len, todo)), unit="clip" if args.num_frames else "img", disable=not state.is_main_process,
              desc=f"rank 0 of {world}") as bar:
        for index, x, errors in loader:
            shard = shards[int(index[0]) // args.shard_size]
            ok = torch.tensor([not e for e in errors])
            for i, e in zip(index.tolist(), errors):
                if e:
                    shard.skip(i, shown(files[i]), e)
                    if state.is_main_process:
                        tqdm.write(f"skipping {shown(files[i])}: {e}")
            if ok.any():
                rows, features = encode(x[ok])
                shard.write(index[ok].numpy(), rows.cpu().numpy(), None if features is None else features.cpu().numpy())
            shard.commit(int(index[-1]) + 1)
            encoded += int(ok.sum())
            bar.update(len(index))
    for shard in shards.values():
        if not shard.finished:  # a shard whose last batch was done before a kill, not yet summed
            shard.finish()
    total = reduce(torch.tensor(float(encoded), device=state.device), "sum").item()
    return int(total), time.time() - start


def parse_args(argv=None):
    """:return: (parser, args); bad values end as parser.error."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-path", type=str, help="ImageFolder root: one sub-folder per class (with --num-frames: "
                                                   "of videos, files or folders of frames)")
    src.add_argument("--fast-dit-path", type=str, help="fast-DiT features folder to convert")
    parser.add_argument("--features-path", type=str, required=True, help="store folder to write")
    parser.add_argument("--image-size", type=int, default=256, help="square crop side in pixels")
    parser.add_argument("--vae", type=str, default="ema",
                        help="ema, mse, a hub id, a save_pretrained folder, or none (pixel space); "
                             "with --fast-dit-path: the VAE the features came from (recorded only)")
    parser.add_argument("--dtype", type=str, choices=["float16", "float32"], default="float16")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder call (per process)")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=16384, help="rows per shard file")
    parser.add_argument("--max-image-pixels", type=int, default=50_000_000,
                        help="skip (and list) images with more pixels (width x height) than this, so that "
                             "one image cannot take gigabytes to decode (50M: about 150 MB as 8-bit RGB)")
    parser.add_argument("--repa-encoder", type=str, default=None,
                        help="also store this timm ViT's patch tokens for REPA (e.g. vit_base_patch14_dinov2.lvd142m)")
    parser.add_argument("--repa-encoder-weights", type=str, default=None,
                        help="the encoder's weights as a local state_dict file (.pth or .safetensors); "
                             "without it timm downloads them from its hub")
    parser.add_argument("--repa-input-size", type=int, default=None,
                        help="the encoder's input side in pixels (default: REPA's, image size * 224 / 256 "
                             "rounded to a multiple of the encoder's patch)")
    parser.add_argument("--num-frames", type=int, default=None,
                        help="the input is videos: store clips of this many frames (Latte: 16)")
    parser.add_argument("--frame-stride", type=int, default=None,
                        help="with --num-frames: a clip takes every this-th frame (default Latte's 3 for UCF-101)")
    parser.add_argument("--clips-per-video", type=int, default=None,
                        help="with --num-frames: at most this many clips of a video, spread evenly (default: "
                             "every clip that fits without overlapping)")
    args = parser.parse_args(argv)
    if args.num_frames is None and (args.frame_stride is not None or args.clips_per_video is not None):
        parser.error("--frame-stride and --clips-per-video need --num-frames (a folder of videos)")
    if args.num_frames is not None:
        if args.fast_dit_path:
            parser.error("--num-frames needs videos (--data-path): fast-DiT's features are images")
        if args.repa_encoder is not None:
            parser.error("--repa-encoder is for images: REPA features of video stores are not made")
        if args.frame_stride is None:
            args.frame_stride = LATTE_FRAME_STRIDE
        if min(args.num_frames, args.frame_stride, 1 if args.clips_per_video is None else args.clips_per_video) <= 0:
            parser.error("--num-frames, --frame-stride and --clips-per-video must be positive")
    if args.repa_encoder is None and (args.repa_encoder_weights is not None or args.repa_input_size is not None):
        parser.error("--repa-encoder-weights and --repa-input-size need --repa-encoder")
    if args.repa_encoder is not None and args.fast_dit_path:
        parser.error("--repa-encoder needs the images (--data-path): fast-DiT's features hold none")
    if args.repa_input_size is not None and args.repa_input_size <= 0:
        parser.error("--repa-input-size must be positive")
    if min(args.image_size, args.batch_size, args.shard_size, args.max_image_pixels) <= 0 or args.num_workers < 0:
        parser.error("--image-size, --batch-size, --shard-size and --max-image-pixels must be positive, "
                     "--num-workers >= 0")
    return parser, args


if __name__ == "__main__":
    run_script(parse_args, main)
