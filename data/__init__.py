"""Tools that make token shards: writing them, synthetic ones, the FineWeb download, tokenizing text."""
