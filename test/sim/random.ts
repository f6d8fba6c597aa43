/**
 * The simulation's only source of randomness: a seeded PRNG (sfc32, seeded
 * through splitmix32). Each part of the simulation (workload, network, disk,
 * faults, crash images) forks its own generator from the seed, so that a
 * change in how often one part draws does not shift what the others draw.
 */

function splitmix32(state: number): () => number {
  let value = state >>> 0;
  return () => {
    value = (value + 0x9e3779b9) >>> 0;
    let mixed = value;
    mixed = Math.imul(mixed ^ (mixed >>> 16), 0x85ebca6b) >>> 0;
    mixed = Math.imul(mixed ^ (mixed >>> 13), 0xc2b2ae35) >>> 0;
    return (mixed ^ (mixed >>> 16)) >>> 0;
  };
}

export class SimRandom {
  private a: number;
  private b: number;
  private c: number;
  private d: number;

  constructor(seed: number) {
    const seeder = splitmix32(seed);
    this.a = seeder();
    this.b = seeder();
    this.c = seeder();
    this.d = seeder();
    // sfc32 needs a few rounds before its output is well mixed.
    for (let round = 0; round < 12; round++) this.nextU32();
  }

  nextU32(): number {
    const t = (((this.a + this.b) >>> 0) + this.d) >>> 0;
    this.d = (this.d + 1) >>> 0;
    this.a = this.b ^ (this.b >>> 9);
    this.b = (this.c + (this.c << 3)) >>> 0;
    this.c = ((this.c << 21) | (this.c >>> 11)) >>> 0;
    this.c = (this.c + t) >>> 0;
    return t;
  }

  /** A number in [0, 1). */
  next(): number {
    return this.nextU32() / 0x1_0000_0000;
  }

  /** An integer in [0, count). */
  below(count: number): number {
    if (!(count >= 1)) throw new Error(`assertion: below(${count})`);
    return Math.floor(this.next() * count);
  }

  /** An integer in [minimum, maximum]. */
  between(minimum: number, maximum: number): number {
    return minimum + this.below(maximum - minimum + 1);
  }

  /** A real number in [minimum, maximum). */
  real(minimum: number, maximum: number): number {
    return minimum + this.next() * (maximum - minimum);
  }

  chance(probability: number): boolean {
    return this.next() < probability;
  }

  pick<T>(items: readonly T[]): T {
    return items[this.below(items.length)]!;
  }

  /** One of the keys, with probability proportional to its weight. */
  weighted<K extends string>(weights: Readonly<Record<K, number>>): K {
    const entries = Object.entries(weights) as [K, number][];
    let total = 0;
    for (const [, weight] of entries) total += weight;
    let roll = this.next() * total;
    for (const [key, weight] of entries) {
      if (roll < weight) return key;
      roll -= weight;
    }
    return entries[entries.length - 1]![0];
  }

  /** An independent generator derived from this one. */
  fork(): SimRandom {
    return new SimRandom(this.nextU32());
  }

  /** Bytes from the generator (write data). */
  fill(target: Buffer): Buffer {
    let at = 0;
    while (at + 4 <= target.length) {
      target.writeUInt32LE(this.nextU32(), at);
      at += 4;
    }
    if (at < target.length) {
      const last = this.nextU32();
      for (let shift = 0; at < target.length; at++, shift += 8) target[at] = (last >>> shift) & 0xff;
    }
    return target;
  }
}
