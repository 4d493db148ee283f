"""The site's pure domain: no I/O."""
