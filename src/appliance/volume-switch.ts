/**
 * The store the NBD server exports for one of the appliance's volumes: it
 * forwards every request to the volume's current stack (the raw file while the
 * volume is not protected, the protection group's quiesce gate → tap → dirty
 * gate → file while it is), and can switch stacks while clients stay connected.
 *
 * A switch holds new writes, zeroes and trims, waits for those in flight to
 * complete, and only then forwards to the new stack. So when protection starts,
 * every write that went to the file beside the tap has completed before the
 * group's first sync read (which the group does only after the switch), and
 * when protection ends, the tap has seen its last write before the group stops.
 * Reads, flushes, cache hints and extent queries are not held: they change
 * nothing, and a flush through either stack reaches the same file.
 */
import type { BackingStore, Extent, WriteData, ZeroOptions } from '../tap/backing-store.js';

export class VolumeSwitch implements BackingStore {
  private current: BackingStore;
  private mutationsInFlight = 0;
  private drained: (() => void) | undefined;
  /** Switches asked for and not done; new mutations wait while there are any. */
  private switchesPending = 0;
  /** Switches run one after another; this settles when the last one asked for is done. */
  private switches: Promise<void> = Promise.resolve();

  constructor(initial: BackingStore) {
    this.current = initial;
  }

  /** The stack requests go to now. */
  get store(): BackingStore {
    return this.current;
  }
  get sizeBytes(): number {
    return this.current.sizeBytes;
  }
  get readOnly(): boolean {
    return this.current.readOnly;
  }

  /**
   * Forwards to `next` from now on, once every write, zero and trim in flight has completed;
   * resolves when the switch is done. `next` must have the same size.
   */
  switchTo(next: BackingStore): Promise<void> {
    if (next.sizeBytes !== this.current.sizeBytes) {
      return Promise.reject(new RangeError(`Cannot switch a volume of ${this.current.sizeBytes} bytes to a store of ${next.sizeBytes} bytes`));
    }
    this.switchesPending++;
    const done = this.switches
      .then(async () => {
        if (this.mutationsInFlight > 0) await new Promise<void>((resolve) => (this.drained = resolve));
        this.current = next;
      })
      .finally(() => this.switchesPending--);
    this.switches = done.catch(() => undefined);
    return done;
  }

  read(target: Buffer, offset: number): Promise<void> {
    return this.current.read(target, offset);
  }
  write(data: WriteData, offset: number): Promise<void> {
    return this.mutate(() => this.current.write(data, offset));
  }
  writeZeroes(offset: number, lengthBytes: number, options: ZeroOptions): Promise<void> {
    return this.mutate(() => this.current.writeZeroes(offset, lengthBytes, options));
  }
  trim(offset: number, lengthBytes: number): Promise<void> {
    return this.mutate(() => this.current.trim(offset, lengthBytes));
  }
  flush(): Promise<void> {
    return this.current.flush();
  }
  cache(offset: number, lengthBytes: number): Promise<void> {
    return this.current.cache(offset, lengthBytes);
  }
  extents(offset: number, lengthBytes: number, extentCountMax: number): Extent[] {
    return this.current.extents(offset, lengthBytes, extentCountMax);
  }
  /** The appliance closes the volume's file itself; the stacks above it hold nothing to close. */
  close(): Promise<void> {
    return Promise.resolve();
  }

  private mutate(operation: () => Promise<void>): Promise<void> {
    if (this.switchesPending > 0) return this.switches.then(() => this.mutate(operation));
    this.mutationsInFlight++;
    let pending: Promise<void>;
    try {
      pending = operation();
    } catch (error) {
      this.settled();
      return Promise.reject(error);
    }
    return pending.then(
      () => this.settled(),
      (error: unknown) => {
        this.settled();
        throw error;
      },
    );
  }

  private settled(): void {
    this.mutationsInFlight--;
    if (this.mutationsInFlight === 0 && this.drained) {
      const drained = this.drained;
      this.drained = undefined;
      drained();
    }
  }
}
