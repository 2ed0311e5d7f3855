"""Everything the dstrain entry scripts share."""
