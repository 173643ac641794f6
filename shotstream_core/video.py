"""Video files and frames: an incremental writer (.mp4 H.264 via PyAV, animated .webp via Pillow), a reader,
and the fitting of footage to a story's size and length.

Frames are [N, H, W, 3], float in [0, 1] or uint8 (numpy or torch), the layout ComfyUI and the engine use.
The mp4 writer encodes each block as it arrives, so a streaming shot is on disk as soon as it is decoded.
Frames go to a hidden partial file beside the target, which replaces the target only when the video is
closed whole: until then an earlier file at the target is untouched, and a failed run leaves it as it was.
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SUFFIXES = (".mp4", ".webp")


def to_uint8(frames) -> np.ndarray:
    """[N, H, W, 3] (or one [H, W, 3] frame), float in [0, 1] or uint8, numpy or torch -> uint8 [N, H, W, 3]."""
    if hasattr(frames, "detach"):  # torch tensor
        frames = frames.detach().cpu()
        frames = frames.float().numpy() if frames.dtype.is_floating_point else frames.numpy()
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [N, H, W, 3] (RGB, channels last), got shape {frames.shape}")
    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    if not np.issubdtype(frames.dtype, np.floating):
        raise ValueError(f"frames must be float in [0, 1] or uint8, got {frames.dtype}")
    if not np.isfinite(frames).all():
        raise ValueError("the frames contain NaN or infinite values: give float frames in [0, 1]")
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _frame_durations_ms(count: int, fps: float) -> list[int]:
    # Whole milliseconds that add up to the exact clip length (16 fps -> 62, 63, 62, 63, ...).
    return [round((i + 1) * 1000 / fps) - round(i * 1000 / fps) for i in range(count)]


# x264's macroblock tree makes the same frames encode to different bytes now and then; with it off, one
# video is one file (the evaluation scores videos as read back, and a data set rebuilt from its seed
# must be the same files). Every mp4 writer passes this as x264-params.
X264_REPRODUCIBLE = "no-mbtree=1"


class VideoWriter:
    """Write frames incrementally: `with VideoWriter("out.mp4", fps=16) as w: w.write(block)`.

    .mp4: H.264, yuv420p (even width and height), CRF `crf` (18 is visually near-lossless).
    .webp: animated WebP (Pillow), frames buffered until close(); `quality` 0-100.
    The frames are written to `partial_path` (.NAME.partialPID.mp4 in the same folder: the same suffix, so the
    same container) and moved onto `path` by close(); discard() (or leaving a with-block by an exception)
    removes only the partial file.
    """

    def __init__(self, path: str | Path, fps: float = 16, crf: int = 18, quality: int = 90):
        self.path = Path(path)
        # same folder (os.replace is atomic within a file system), same suffix (it picks the container)
        # (and named per process, so two runs writing one target do not share a partial file)
        self.partial_path = self.path.with_name(f".{self.path.stem}.partial{os.getpid()}{self.path.suffix}")
        if self.path.suffix.lower() not in SUFFIXES:
            raise ValueError(f"unsupported video type {self.path.suffix!r}; use one of {SUFFIXES}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps, self.crf, self.quality = fps, crf, quality
        self.frames_written = 0
        self._size: tuple[int, int] | None = None  # (H, W)
        self._container = self._stream = None
        self._buffer: list[np.ndarray] = []  # webp only
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def is_mp4(self) -> bool:
        return self.path.suffix.lower() == ".mp4"

    def _open_mp4(self, height: int, width: int) -> None:
        import av

        if height % 2 or width % 2:
            raise ValueError(f"mp4 (yuv420p) needs even width and height, got {width}x{height}; crop or pad by 1")
        self._container = av.open(str(self.partial_path), mode="w")
        self._stream = self._container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001))
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(self.crf), "preset": "fast", "x264-params": X264_REPRODUCIBLE}

    def write(self, frames) -> None:
        """Append frames [N, H, W, 3] (float 0..1 or uint8) or a single [H, W, 3] frame."""
        if self._closed:
            raise RuntimeError(f"VideoWriter for {self.path} is closed")
        frames = to_uint8(frames)
        size = frames.shape[1:3]
        if self._size is None:
            self._size = size
            if self.is_mp4:
                self._open_mp4(*size)
        elif size != self._size:
            raise ValueError(f"frame size {size[1]}x{size[0]} differs from this video's {self._size[1]}x{self._size[0]}")
        if self.is_mp4:
            import av

            for frame in frames:
                for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    self._container.mux(packet)
        else:
            self._buffer.extend(frames)
        self.frames_written += len(frames)

    def close(self) -> None:
        """Flush and finalise the file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.frames_written == 0:
            return  # nothing to write: no file is created (and an earlier one is left alone)
        try:
            if self.is_mp4:
                for packet in self._stream.encode(None):
                    self._container.mux(packet)
                self._container.close()
            else:
                from PIL import Image

                images = [Image.fromarray(f) for f in self._buffer]
                images[0].save(self.partial_path, format="WEBP", save_all=True, append_images=images[1:], loop=0,
                               duration=_frame_durations_ms(len(images), self.fps), quality=self.quality)
                self._buffer.clear()
        except BaseException:
            self._remove_partial()
            raise
        try:
            os.replace(self.partial_path, self.path)  # only now is a file at `path` replaced
        except OSError as e:  # the video is whole: keep it where it is and say so, rather than lose the work
            raise OSError(f"the finished video could not replace {self.path} ({e.strerror or e}); it is kept "
                          f"as {self.partial_path}") from e

    def discard(self) -> None:
        """Stop without finishing: the partial file is removed and `path` is left as it was (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._buffer.clear()
        self._remove_partial()

    def _remove_partial(self) -> None:
        container, self._container = self._container, None
        try:
            if container is not None:
                container.close()
        except Exception:  # a half-written stream may not close cleanly; the file goes either way
            pass
        finally:
            self.partial_path.unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        # a failed or interrupted write leaves no half-written video, and an earlier file at `path` untouched
        if exc_type is None:
            self.close()
        else:
            self.discard()


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """(uint8 frames [N, H, W, 3], fps) of a video or an image: .mp4 (or another container PyAV reads), or
    any image Pillow reads, animated (.webp, .gif, .png) or still (one frame, fps 0)."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such video: {path}")
    if path.suffix.lower() in Image.registered_extensions():
        try:
            im = Image.open(path)
        except UnidentifiedImageError:
            raise ValueError(f"{path} is not an image Pillow can read") from None
        with im:
            frames, durations = [], []
            for frame in ImageSequence.Iterator(im):
                frames.append(np.asarray(frame.convert("RGB")))
                durations.append(frame.info.get("duration", 0))
        fps = 1000.0 * len(durations) / sum(durations) if sum(durations) else 0.0
        # Durations are whole milliseconds, so the rate is known to about 1%: snap to a whole fps near it.
        if fps and abs(fps - round(fps)) < 0.01 * fps:
            fps = float(round(fps))
        return np.stack(frames), fps

    import av

    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise ValueError(f"{path} is not a video PyAV can read ({e})") from None
    with container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        rate = stream.average_rate or stream.guessed_rate or 0
    if not frames:
        raise ValueError(f"{path} has no video frames")
    return np.stack(frames), float(rate)


def fit_frames(frames, height: int, width: int, count: int) -> torch.Tensor:
    """Footage -> uint8 [count, height, width, 3]: the shot a story of that size and length can hold.

    frames: [N, H, W, 3] or one [H, W, 3] image, float in [0, 1] or uint8, numpy or torch. `count` frames are
    taken evenly spaced over the clip (the first and last kept; a single image becomes a still shot), then
    each is centre-cropped to the target's aspect and resized with an antialiased bilinear filter, so
    nothing is stretched and a larger source is not aliased.
    """
    if not hasattr(frames, "shape"):
        frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or 0 in frames.shape[:3]:
        to_uint8(frames)  # names a wrong layout
        raise ValueError(f"no frames to fit (shape {tuple(frames.shape)}): give at least one image")
    # Pick first, then convert: a long clip of float frames is never copied whole.
    picks = torch.linspace(0, frames.shape[0] - 1, count).round().long()
    picked = frames[picks] if isinstance(frames, torch.Tensor) else frames[picks.numpy()]
    pixels = torch.from_numpy(np.array(to_uint8(picked)))  # [count, H, W, 3], writable
    # The largest centre crop of the target's aspect (width / height compared as cross products: exact).
    h, w = pixels.shape[1:3]
    if w * height > width * h:
        crop_w = max(1, round(h * width / height))
        x0 = (w - crop_w) // 2
        pixels = pixels[:, :, x0:x0 + crop_w]
    elif w * height < width * h:
        crop_h = max(1, round(w * height / width))
        y0 = (h - crop_h) // 2
        pixels = pixels[:, y0:y0 + crop_h]
    if tuple(pixels.shape[1:3]) == (height, width):
        return pixels.contiguous()
    x = pixels.permute(0, 3, 1, 2).float()  # [count, 3, h', w']
    x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
