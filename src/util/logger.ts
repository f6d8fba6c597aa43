/**
 * Structured logging: one line per event, `time level message key=value…` for
 * people or one JSON object per line for machines.
 */
export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
export type LogFields = Record<string, unknown>;

export interface Logger {
  debug(message: string, fields?: LogFields): void;
  info(message: string, fields?: LogFields): void;
  warn(message: string, fields?: LogFields): void;
  error(message: string, fields?: LogFields): void;
}

const levelRank: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export const silentLogger: Logger = { debug() {}, info() {}, warn() {}, error() {} };

export interface StreamLoggerOptions {
  level: LogLevel;
  format: 'text' | 'json';
  write?: (line: string) => void;
}

export function createLogger(options: StreamLoggerOptions): Logger {
  const minimum = levelRank[options.level];
  const write = options.write ?? ((line: string) => process.stderr.write(line + '\n'));
  const emit = (level: LogLevel, message: string, fields: LogFields = {}): void => {
    if (levelRank[level] < minimum) return;
    const time = new Date().toISOString();
    if (options.format === 'json') {
      write(JSON.stringify({ time, level, message, ...fields }));
      return;
    }
    const pairs = Object.entries(fields).map(([key, value]) => `${key}=${typeof value === 'string' && !/\s/.test(value) ? value : JSON.stringify(value)}`);
    write([time, level.toUpperCase().padEnd(5), message, ...pairs].join(' '));
  };
  return {
    debug: (message, fields) => emit('debug', message, fields),
    info: (message, fields) => emit('info', message, fields),
    warn: (message, fields) => emit('warn', message, fields),
    error: (message, fields) => emit('error', message, fields),
  };
}
