"""The synthetic federation as a researcher handles it: `fedmeta synth`, `show-sites`, the anatomy asset."""
