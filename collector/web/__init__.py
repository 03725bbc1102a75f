"""The web page at the collector's HTTP port (`/`) and the JSON API it reads (`/api/v1/...`)."""
