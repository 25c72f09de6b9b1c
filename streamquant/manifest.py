"""Name of the file that marks a directory as streamquant output (written last, atomically)."""

MANIFEST = "streamquant_manifest.json"
