"""wds-ocr: DBNet text-detection data prepared once, offline, into verifiable WebDataset shards."""

__version__ = "0.1.0"
