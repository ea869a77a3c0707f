"""data_prep: ImageNet (or any class-folder image set) into webdataset shards on a path or S3.

Commands (``python -m data_prep --help`` shows them with examples)::

    python -m data_prep synthetic --out data/digits            # a small real dataset, offline
    python -m data_prep shard --src data/digits --out s3://datasets/digits --samples-per-shard 128 --workers 2
    python -m data_prep verify s3://datasets/digits

The same in Python: ``data_prep.synthetic.make_digits_imagefolder``, ``data_prep.shard.shard_dataset``
and ``data_prep.verify.verify_shards``. Training streams the result with ``localsgd_ds.data``.
"""

__version__ = "0.1.0"
