"""The data plane (DESIGN sections 4 and 5): datasets become class-mixed WebDataset
shards, and shards become batches of replayable views.

    sources.py       datasets catkd reads (image folders, CIFAR pickles, synthetic)
    shard_format.py  the shard tar format and its index
    shard_writer.py  ``catkd shard``: a source -> shards, one Ray task per shard
    views.py         augmentation specs, view parameters and the CPU view renderer
    device_render.py the device view renderer: all S views of an image, batched, on the GPU
    host_images.py   the host's part of the device path: decode or pack JPEGs for nvJPEG
    order.py         which shards each rank and loader worker reads in an epoch
    loader.py        the streaming loader that training and evaluation read from
    synthetic.py     the project's own generated dataset
"""
