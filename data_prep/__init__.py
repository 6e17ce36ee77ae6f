"""Turning raw corpora into mosaicml-streaming shards of token sequences (`pope prep`)."""
