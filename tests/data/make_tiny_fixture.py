#!/usr/bin/env python3
"""Writes tests/data/tiny_uint16_text_document.{bin,idx}: a tiny Megatron indexed dataset, laid
out with `struct` exactly as Megatron Core's IndexedDatasetBuilder / _IndexWriter write it
(megatron/core/datasets/indexed_dataset.py), independently of libmoecore's writer.

    python3 tests/data/make_tiny_fixture.py            # rewrites the pair next to this script

Contents (byte-tokenizer ids, eod = 256 appended as preprocess_data --append-eod does, so the
dtype is uint16, Megatron's choice for a vocabulary < 65500):
    document 0: "Hello" + eod  -> one sequence of 6 tokens
    document 1: ""             -> no sequence (Megatron's builder records an empty document so)
    document 2: "MoE!" + eod   -> one sequence of 5 tokens
    document 3: "x" + eod      -> one sequence of 2 tokens

.idx (110 bytes):
    b"MMIDIDX\\x00\\x00"   magic (9)
    <Q 1                  version
    <B 8                  dtype code (uint16)
    <Q 3                  sequence count
    <Q 5                  document count = len(document_indices)
    <i 6 5 2              sequence lengths
    <q 0 12 22            sequence pointers (bytes: cumulative length * 2)
    <q 0 1 1 2 3          document indices (leading 0, then where each document ends)
.bin (26 bytes): the 13 tokens as <H.
"""
import os
import struct

EOD = 256
DOCS = ["Hello", "", "MoE!", "x"]
UINT16_CODE = 8
ITEMSIZE = 2


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    prefix = os.path.join(here, "tiny_uint16_text_document")

    sequence_lengths = []
    document_indices = [0]
    tokens = []
    for text in DOCS:
        ids = list(text.encode("utf-8"))
        if ids:  # preprocess_data: eod only after a non-empty document
            ids.append(EOD)
            sequence_lengths.append(len(ids))
            tokens.extend(ids)
        document_indices.append(len(sequence_lengths))

    pointers = []
    ptr = 0
    for length in sequence_lengths:
        pointers.append(ptr)
        ptr += length * ITEMSIZE

    with open(prefix + ".bin", "wb") as f:
        f.write(struct.pack("<%dH" % len(tokens), *tokens))

    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", UINT16_CODE))
        f.write(struct.pack("<Q", len(sequence_lengths)))
        f.write(struct.pack("<Q", len(document_indices)))
        f.write(struct.pack("<%di" % len(sequence_lengths), *sequence_lengths))
        f.write(struct.pack("<%dq" % len(pointers), *pointers))
        f.write(struct.pack("<%dq" % len(document_indices), *document_indices))

    print("wrote %s.{bin,idx}: %d sequences, %d documents, %d tokens"
          % (prefix, len(sequence_lengths), len(document_indices) - 1, len(tokens)))


if __name__ == "__main__":
    main()
