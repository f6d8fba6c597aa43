/** Parses a size such as `4096`, `512K`, `1G`, `10GiB` or `1.5M` into bytes (binary units). */
export function parseSizeBytes(text: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?\s*$/i.exec(text);
  if (!match) throw new Error(`Cannot read size '${text}': use a number of bytes or a number with K, M, G, T or P`);
  const units = ['', 'k', 'm', 'g', 't', 'p'];
  const power = units.indexOf(match[2]!.toLowerCase());
  const bytes = Number(match[1]) * 1024 ** power;
  if (!Number.isSafeInteger(bytes)) throw new Error(`Cannot use size '${text}': it is not a whole number of bytes below 2^53`);
  return bytes;
}

export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${unit === 0 ? value : value.toFixed(1)} ${units[unit]}`;
}
