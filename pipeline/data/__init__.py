"""The data plane (DESIGN sections 4 and 5): datasets become class-mixed WebDataset
shards, and shards become batches of replayable views.

    sources.py       datasets catkd reads (image folders, CIFAR pickles, synthetic)
    shard_format.py  the shard tar format and its index
    shard_writer.py  ``catkd shard``: a source -> shards, one Ray task per shard
    views.py         augmentation specs, view parameters and the one view renderer
    order.py         which shards each rank and loader worker reads in an epoch
    loader.py        the streaming loader that training and evaluation read from
    synthetic.py     the project's own generated dataset
"""
