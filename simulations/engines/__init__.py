"""What starts and stops engines: the in-process engine, Flower's own engines, and process handling."""
