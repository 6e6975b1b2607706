"""sfmkern's data layer: image sources (folders, tar shards, arrays, Fashion-MNIST, photo patches) and the
streaming decoder.

    src = ImageFolder("train/")                      # or TarShards("shards/*.tar"), ArraySource(x, y), fashion_mnist()
    it = stream(src, batch_size=256, resize=256, crop=224, shard=(rank, world))
    for batch in it: ...                             # Batch(images uint8 [B,224,224,3], labels, indices, position)
    it.report.skipped, it.report.class_counts

`DECODER_VERSION` names the decoder build and its pixel-affecting behaviour; statistics files record it.
"""

from sfmkern.data._ext import DECODER_VERSION, DEFAULT_MAX_PIXELS
from sfmkern.data.fashion_mnist import fashion_mnist
from sfmkern.data.photo_patches import photo_patches
from sfmkern.data.sources import (
    IMG_EXTENSIONS,
    ArraySource,
    ImageFolder,
    Source,
    SubsetSource,
    TarShards,
    check_classes_nonempty,
    display_name,
)
from sfmkern.data.stream import Batch, StreamIterator, StreamReport, load_images, stream

__all__ = [
    "DECODER_VERSION",
    "DEFAULT_MAX_PIXELS",
    "IMG_EXTENSIONS",
    "ArraySource",
    "Batch",
    "ImageFolder",
    "Source",
    "StreamIterator",
    "StreamReport",
    "SubsetSource",
    "TarShards",
    "check_classes_nonempty",
    "display_name",
    "fashion_mnist",
    "load_images",
    "photo_patches",
    "stream",
]
