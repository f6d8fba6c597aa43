/**
 * Copies the built Lifeline into a benchmark's directory so that a rebuild of the shared work tree
 * during a long run cannot change the code under test half-way (used by bench:nbd and
 * bench:replication).
 */
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { repositoryRoot } from '../test/helpers.js';

/** Copies dist/src, the native addon, bin and package.json into `dir`; returns a SHA-256 over them, to tell builds apart. */
export function snapshotLifeline(dir: string): { bin: string; sha256: string; staleSources: string[] } {
  const root = path.join(dir, 'lifeline');
  const hash = crypto.createHash('sha256');
  const copy = (from: string, to: string): void => {
    fs.mkdirSync(path.dirname(to), { recursive: true });
    fs.copyFileSync(from, to);
    hash.update(path.relative(dir, to)).update(fs.readFileSync(to));
  };
  const staleSources: string[] = [];
  const walk = (relative: string): void => {
    const entries = fs.readdirSync(path.join(repositoryRoot, 'dist', relative), { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name));
    for (const entry of entries) {
      const child = path.join(relative, entry.name);
      if (entry.isDirectory()) walk(child);
      else if (entry.name.endsWith('.js') && !entry.name.endsWith('.test.js')) {
        copy(path.join(repositoryRoot, 'dist', child), path.join(root, 'dist', child));
        const source = path.join(repositoryRoot, child.replace(/\.js$/, '.ts'));
        if (fs.existsSync(source) && fs.statSync(source).mtimeMs > fs.statSync(path.join(repositoryRoot, 'dist', child)).mtimeMs) staleSources.push(child.replace(/\.js$/, '.ts'));
      }
    }
  };
  walk('src');
  copy(path.join(repositoryRoot, 'build', 'Release', 'lifeline_native.node'), path.join(root, 'build', 'Release', 'lifeline_native.node'));
  copy(path.join(repositoryRoot, 'bin', 'lifeline'), path.join(root, 'bin', 'lifeline'));
  copy(path.join(repositoryRoot, 'package.json'), path.join(root, 'package.json'));
  return { bin: path.join(root, 'bin', 'lifeline'), sha256: hash.digest('hex').slice(0, 16), staleSources };
}
