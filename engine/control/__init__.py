"""OSC control: state written by handlers, the UDP server, feedback, scenes and OSCQuery."""
