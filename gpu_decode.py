"""--decode gpu, both halves: the workers read bytes and draw the crops, the device decodes and resizes whole batches.
"""
import collections
import contextlib
import queue
import threading

import torch
import torch.nn.functional as F

import transforms
from transforms import load_rgb, random_resized_crop_box, takes_jpeg_decoder, to_uint8_hwc


class EncodedTrainTransform(transforms.TrainTransform):
    """The worker's half: the file's bytes, with the crop box and flip drawn as TrainTransform draws them; --augment is
    refused with --decode gpu. What nvJPEG cannot take (PNG, CMYK, rotated) is decoded here, full size."""

    def __call__(self, path, encoded, rng, epoch=0):
        size, jpeg = takes_jpeg_decoder(encoded)
        content, shape = encoded, None
        if not jpeg:
            pixels = to_uint8_hwc(load_rgb(path, encoded))
            size, content, shape = (pixels.shape[1], pixels.shape[0]), pixels.numpy().tobytes(), pixels.shape
        box = random_resized_crop_box(*size, rng, self.scale)
        return EncodedSample(path, content, shape, box, rng.random() < 0.5, self.size_at(epoch))


# A training sample before decoding: JPEG bytes (`shape` None) or uint8 (H, W, 3) pixel bytes.
EncodedSample = collections.namedtuple("EncodedSample", "path content shape box flip size")


class EncodedBatch:
    """EncodedSamples as one byte tensor (one shared-memory block a batch) with their lengths, boxes, flips."""

    def __init__(self, samples):
        self.paths, contents, self.shapes, self.boxes, self.flips, sizes = map(list, zip(*samples))
        self.size, self.lengths = sizes[0], [len(content) for content in contents]
        self.payload = torch.frombuffer(bytearray(b"".join(contents)), dtype=torch.uint8)

    def pin_memory(self):
        """The DataLoader's pin-memory thread: the worker-decoded pixels then reach the GPU asynchronously."""
        self.payload = self.payload.pin_memory()
        return self


def collate(samples):
    """The loader's collate_fn with --decode gpu: (EncodedBatch, labels)."""
    return EncodedBatch([s[0] for s in samples]), torch.tensor([s[1] for s in samples])


# CUDA's antialiased resize keeps a block's filter weights in its 48 KiB of shared memory. By the
# kernel's block-size formula (read, not run), for bicubic float32 past about 47x downscale on both
# axes no row of threads fits (an error, or a host division by zero), past about 94x it refuses ("Too
# much shared memory required"); at 32x a block still has one row. The CPU kernels have no limit.
AA_MAX_DOWNSCALE = 32


def resize_stages(height, width, size):
    """The (h, w) of the successive resizes to (size, size), none shrinking an axis more than
    AA_MAX_DOWNSCALE times: [(size, size)] but for extreme crops. The last stages shrink most, so the
    blur stays close to one resize's; an axis with fewer stages keeps its length until its own."""
    stages, step = [(size, size)], size * AA_MAX_DOWNSCALE
    while height > step or width > step:
        stages.insert(0, (min(height, step), min(width, step)))
        step *= AA_MAX_DOWNSCALE
    return stages


def antialiased_resize(x, size):
    """float (N, 3, h, w) -> (N, 3, size, size), antialiased bicubic, in stages where CUDA needs them."""
    for stage in resize_stages(x.shape[-2], x.shape[-1], size):
        x = F.interpolate(x, size=stage, mode="bicubic", antialias=True)
    return x


class BatchDecoder:
    """The device's half: EncodedBatch -> float32 (N, 3, size, size) in 0..255 on `device`: one decode call, then each
    box resized (bicubic in float: CUDA has no uint8 kernel) and flipped. On CUDA its caller waits twice a batch."""

    def __init__(self, device, channels_last=False):
        self.device, self.channels_last = torch.device(device), channels_last

    def __call__(self, batch):
        contents = batch.payload.split(batch.lengths)
        jpegs = [i for i, shape in enumerate(batch.shapes) if shape is None]
        decoded = dict(zip(jpegs, self.decode_jpegs([contents[i] for i in jpegs], [batch.paths[i] for i in jpegs])))
        crops = []
        for i, (left, top, right, bottom) in enumerate(batch.boxes):  # else decoded by the worker: (H, W, 3) bytes
            image = decoded[i] if i in decoded else \
                contents[i].to(self.device, non_blocking=True).view(batch.shapes[i]).permute(2, 0, 1)
            crops.append(antialiased_resize(image[None, :, top:bottom, left:right].float(), batch.size))
        x = torch.cat(crops).clamp_(0, 255)  # bicubic overshoots; the CPU path's uint8 clamps too
        flips = torch.tensor(batch.flips).to(self.device, non_blocking=True).view(-1, 1, 1, 1)
        x = torch.where(flips, x.flip(-1), x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def decode_jpegs(self, encoded, paths):
        if not encoded:
            return []
        if self.device.type == "cuda":
            # nvJPEG writes from its own stream, which does not wait for this one: kernels still
            # queued here could read memory it reuses (torchvision PR #9606). Drain this stream
            # (the caller's thread waits; nvJPEG then waits for its own stream as well).
            torch.cuda.current_stream(self.device).synchronize()
        try:
            return transforms.decode_jpegs(encoded, self.device)
        except RuntimeError:  # one bad file fails the whole call: find it
            return [self.decode_one(content, path) for content, path in zip(encoded, paths)]

    def decode_one(self, content, path):
        try:
            return transforms.decode_jpegs([content], self.device)[0]
        except RuntimeError:  # PIL decodes what it can (libjpeg warnings) and names the rest
            return to_uint8_hwc(load_rgb(path, content.numpy().tobytes())).to(self.device).permute(2, 0, 1)


def decode_ahead(loader, to_device, stream, device):
    """to_device(batch) of each batch of `loader`, computed in a thread on the side `stream` (None: CPU)
    and yielded once queued: the thread's waits for nvJPEG overlap the step the training thread queues.
    At most two batches ahead. Stopping early, or an error, joins the thread before the next epoch."""
    batches = iter(loader)  # in this thread: a DataLoader sets up signal handling here
    ready, stop = queue.Queue(maxsize=1), threading.Event()
    thread = threading.Thread(target=_decode_all, args=(batches, to_device, stream, ready, stop), daemon=True,
                              name="DeviceLoader-decode")
    thread.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            images, labels, queued = item
            if queued is not None:  # CUDA
                compute = torch.cuda.current_stream(device)
                compute.wait_event(queued)
                images.record_stream(compute)
                labels.record_stream(compute)
            yield images, labels
    finally:
        stop.set()
        thread.join()


def _decode_all(batches, to_device, stream, ready, stop):
    """The decode thread: each batch into `ready`, then None, or the exception the training thread raises."""
    try:
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():  # also its device
            for batch in batches:
                if stop.is_set():
                    return
                images, labels = to_device(batch)
                queued = stream.record_event() if stream is not None else None  # after the batch's work
                _put_unless_stopped(ready, (images, labels, queued), stop)
        _put_unless_stopped(ready, None, stop)
    except BaseException as e:  # handed over, not swallowed
        _put_unless_stopped(ready, e, stop)


def _put_unless_stopped(q, item, stop):
    while not stop.is_set():
        with contextlib.suppress(queue.Full):
            return q.put(item, timeout=0.05)
