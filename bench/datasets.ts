/**
 * Data sets shared by the benchmarks (bench:codec, bench:replication): 4 KiB blocks of the kinds a
 * virtual disk holds, drawn from a seeded PRNG so that runs compare the same bytes.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

export const blockBytes = 4096;

export function randomBytes(size: number, random: () => number): Buffer {
  const out = Buffer.alloc(size);
  for (let i = 0; i + 4 <= size; i += 4) out.writeUInt32LE((random() * 0x100000000) >>> 0, i);
  return out;
}

export function logText(size: number, random: () => number): Buffer {
  const levels = ['INFO', 'INFO', 'INFO', 'DEBUG', 'WARN', 'ERROR'];
  const messages = [
    'journal: appended %d records (lsn %d..%d) in %d ms',
    'nbd: client 10.0.%d.%d connected, export vm-%d, %d connections',
    'replication: batch %d sent, %d bytes raw, %d bytes on the wire',
    'tap: flush of volume %d took %d ms, %d writes pending',
    'kernel: EXT4-fs (vda%d): mounted filesystem with ordered data mode, %d inodes',
  ];
  let text = '';
  let timeMs = 1_795_000_000_000;
  while (text.length < size) {
    timeMs += Math.floor(random() * 5000);
    const message = messages[Math.floor(random() * messages.length)]!.replace(/%d/g, () => String(Math.floor(random() * 100_000)));
    text += `${new Date(timeMs).toISOString()} host-${Math.floor(random() * 20)} lifeline[${1000 + Math.floor(random() * 50)}]: ${levels[Math.floor(random() * levels.length)]} ${message}\n`;
  }
  return Buffer.from(text.slice(0, size), 'latin1');
}

/** Real files of this machine, read in path order until `size` bytes. */
export function systemBinaries(size: number): { data: Buffer; source: string } {
  const out = Buffer.alloc(size);
  let at = 0;
  const roots = ['/usr/lib/x86_64-linux-gnu', '/usr/lib', '/usr/bin'].filter((root) => fs.existsSync(root));
  const walk = (dir: string): void => {
    let names: string[];
    try {
      names = fs.readdirSync(dir).sort();
    } catch {
      return;
    }
    for (const name of names) {
      if (at >= size) return;
      const full = path.join(dir, name);
      const stat = fs.lstatSync(full, { throwIfNoEntry: false });
      if (!stat) continue;
      if (stat.isDirectory()) walk(full);
      else if (stat.isFile() && stat.size >= blockBytes) {
        try {
          const data = fs.readFileSync(full);
          at += data.copy(out, at, 0, Math.min(data.length, size - at));
        } catch {
          // Unreadable: skip it.
        }
      }
    }
  };
  for (const root of roots) walk(root);
  return { data: out.subarray(0, at), source: roots.join(', ') };
}

/** 4 KiB of inode-table-like records: 256-byte entries of small, close numbers and zero padding. */
export function inodeBlock(random: () => number): Buffer {
  const out = Buffer.alloc(blockBytes);
  const baseTime = 1_700_000_000 + Math.floor(random() * 1_000_000);
  let block = Math.floor(random() * 1_000_000);
  for (let record = 0; record < blockBytes / 256; record++) {
    const at = record * 256;
    if (random() < 0.2) continue; // a free inode
    out.writeUInt16LE(random() < 0.7 ? 0o100644 : 0o040755, at);
    out.writeUInt16LE(1000, at + 2);
    out.writeUInt32LE(Math.floor(random() * 200_000), at + 4);
    for (let t = 0; t < 4; t++) out.writeUInt32LE(baseTime + Math.floor(random() * 100), at + 8 + 4 * t);
    out.writeUInt16LE(1000, at + 24);
    out.writeUInt16LE(1, at + 26);
    for (let pointer = 0; pointer < 12; pointer++) {
      block += 1 + Math.floor(random() * 3);
      out.writeUInt32LE(block, at + 40 + 4 * pointer);
    }
  }
  return out;
}

export function vmMix(size: number, random: () => number, binaries: Buffer): Buffer {
  const out = Buffer.alloc(size);
  for (let at = 0; at < size; at += blockBytes) {
    const pick = random();
    let block: Buffer;
    if (pick < 0.3) continue; // zeros
    else if (pick < 0.45) block = randomBytes(blockBytes, random);
    else if (pick < 0.6) block = logText(blockBytes, random);
    else if (pick < 0.85) {
      const from = Math.floor((random() * (binaries.length - blockBytes)) / blockBytes) * blockBytes;
      block = binaries.subarray(from, from + blockBytes);
    } else block = inodeBlock(random);
    block.copy(out, at);
  }
  return out;
}
