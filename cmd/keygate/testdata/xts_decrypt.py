#!/usr/bin/env python3
# Independent AES-XTS reference: OpenSSL through Python's cryptography package.
# usage: xts_decrypt.py KEY_HEX TWEAK < ciphertext > plaintext
# TWEAK is the LUKS2 plain64 IV: the sector number in 512-byte units, as a
# 128-bit little-endian value.
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

key = bytes.fromhex(sys.argv[1])
tweak = int(sys.argv[2]).to_bytes(16, "little")
data = sys.stdin.buffer.read()
d = Cipher(algorithms.AES(key), modes.XTS(tweak)).decryptor()
sys.stdout.buffer.write(d.update(data) + d.finalize())
