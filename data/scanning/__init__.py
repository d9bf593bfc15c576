"""The scan's parts: `walk` finds the image files under a folder (links followed, each real folder and file once),
`index` keeps what scanning learned of each file so that an unchanged one is not read again. data/scan.py puts
them together into a `Scan`."""
