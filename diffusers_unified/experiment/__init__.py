"""The only code that reads a ConfigDict: configs -> objects -> train / sample / eval runs."""
